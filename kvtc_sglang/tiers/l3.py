"""L3 storage backends behind one small interface: ``L3Backend``, ``DirectoryBackend`` and the factory.

``MooncakeBackend`` (the Mooncake distributed store) lives in ``l3_mooncake`` and is importable from here.

Conventions follow SGLang's ``HiCacheStorage`` (``sglang.srt.mem_cache.hicache_storage``) where they fit: string
keys, ``exists``/``get``/``put`` that report misses and failures as values (``None``/``False``) instead of
raising, the backend picked by name plus an extra-config JSON dict (``--hicache-storage-backend`` and
``--hicache-storage-backend-extra-config``; ``backend_from_config`` reuses the Mooncake key names of SGLang's
``MooncakeStoreConfig.load_from_extra_config``). Where ours differs, and why:

* Objects are variable-size opaque bytes (one compressed, framed chunk of tokens, see ``frame``), not
  fixed-size pages of host-pool rows: no host indices, no zero-copy buffer registration, no per-layer or
  per-head key suffixes (the codec's payload holds every layer and head of the chunk).
* ``exists`` returns one bool per key (the caller takes the prefix); SGLang's ``batch_exists`` returns the
  length of the leading run of hits.
* A put of a key that exists succeeds without rewriting: keys are content-addressed, the bytes are the same.
* Only ``ValueError`` (bad arguments) leaves a call; backend errors and timeouts are logged and become a miss
  or ``False``. A call may still block (a dead Mooncake master stalls a put for seconds): ``L3Client`` keeps
  every backend call off the scheduler's thread and puts a deadline on prefetches.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import uuid
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtc_sglang.tiers.l3_mooncake import MooncakeBackend

logger = logging.getLogger(__name__)

MAX_KEY_CHARS = 250
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
WHEN_FULL = ("evict", "refuse")
EVICT_TO = 0.9  # eviction frees space down to this fraction of max_bytes (amortizes the directory scan)


def check_key(key: str) -> str:
    """``key`` if it is a valid object key (letters, digits, ``._-``, at most 250 characters; safe as a file
    name and a Mooncake key); raises ``ValueError`` otherwise."""
    if not isinstance(key, str) or len(key) > MAX_KEY_CHARS or not _KEY.match(key):
        raise ValueError(f"key: expected 1..{MAX_KEY_CHARS} characters of [A-Za-z0-9._-] starting with a letter "
                         f"or digit, got {key!r:.80}")  # fmt: skip
    return key


def check_data(data: bytes) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview) or len(data) == 0:
        raise ValueError(f"data: expected non-empty bytes, got {type(data).__name__} of length "
                         f"{len(data) if hasattr(data, '__len__') else '?'}")  # fmt: skip
    return bytes(data)


class L3Backend(ABC):
    """A shared store of opaque objects by key. Calls report failures as values and raise only ``ValueError``
    for bad arguments; they may block (call them off the serving thread, see ``L3Client``)."""

    name: str = "l3"

    @abstractmethod
    def exists(self, keys: list[str]) -> list[bool]:
        """Whether each key is stored (``False`` on error)."""

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object's bytes, or ``None`` on a miss or an error."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> bool:
        """Stores ``data`` under ``key``; ``True`` when stored (or already there), ``False`` when refused or failed."""

    @abstractmethod
    def close(self) -> None:
        """Releases the backend (bounded in time); later calls miss."""


class DirectoryBackend(L3Backend):
    """One file per key under ``path`` (``path/<2 hex>/<key>``), written atomically (temp file + ``os.replace``),
    so objects survive restarts and several processes can share the folder (a local or network file system).

    ``max_bytes`` bounds the stored bytes: when a put would exceed it, ``when_full="evict"`` deletes the least
    recently used files (reads refresh a file's mtime) down to 90% of the bound, ``"refuse"`` fails the put.
    The count is this instance's: it is rebuilt from the folder at start and at each eviction. Files are not
    fsynced: a crash of the machine may lose recent objects (never half-written ones: readers check frames)."""

    name = "directory"

    def __init__(self, path: str | os.PathLike, max_bytes: int | None = None, when_full: str = "evict") -> None:
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
            raise ValueError(f"max_bytes: expected None or an int >= 1, got {max_bytes!r}")
        if when_full not in WHEN_FULL:
            raise ValueError(f"when_full: expected one of {WHEN_FULL}, got {when_full!r}")
        self.root = Path(path)
        self.max_bytes = max_bytes
        self.when_full = when_full
        self._lock = threading.Lock()
        self._closed = False
        self.root.mkdir(parents=True, exist_ok=True)
        self._used = sum(size for _, size, _ in self._scan())

    def _path(self, key: str) -> Path:
        return self.root / format(hash_bucket(key), "02x") / key

    def _scan(self) -> list[tuple[float, int, Path]]:
        """Every stored object as ``(mtime, size, path)``; temp files and vanished files are skipped."""
        out = []
        for sub in self.root.iterdir():
            if not sub.is_dir():
                continue
            for entry in os.scandir(sub):
                if entry.name.startswith(".tmp-"):
                    continue
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                out.append((st.st_mtime, st.st_size, Path(entry.path)))
        return out

    @property
    def used_bytes(self) -> int:
        return self._used

    def exists(self, keys: list[str]) -> list[bool]:
        paths = [self._path(check_key(k)) for k in keys]
        return [not self._closed and p.is_file() for p in paths]

    def get(self, key: str) -> bytes | None:
        path = self._path(check_key(key))
        if self._closed:
            return None
        try:
            data = path.read_bytes()
            os.utime(path)  # least recently used goes first
        except FileNotFoundError:
            return None
        except OSError as e:
            logger.warning("L3 directory get %s failed: %s", key, e)
            return None
        return data

    def _make_room(self, nbytes: int) -> bool:
        """Under the lock: whether ``nbytes`` more fit, evicting the oldest files if allowed."""
        if self.max_bytes is None or self._used + nbytes <= self.max_bytes:
            return True
        if self.when_full == "refuse" or nbytes > self.max_bytes:
            return False
        files = sorted(self._scan(), key=lambda f: f[0])
        self._used = sum(size for _, size, _ in files)
        target = min(int(self.max_bytes * EVICT_TO), self.max_bytes - nbytes)
        for _, size, path in files:
            if self._used <= target:
                break
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                logger.warning("L3 directory eviction of %s failed: %s", path, e)
                continue
            self._used -= size
        return self._used + nbytes <= self.max_bytes

    def put(self, key: str, data: bytes) -> bool:
        path = self._path(check_key(key))
        data = check_data(data)
        if self._closed:
            return False
        if path.is_file():
            return True
        with self._lock:
            if not self._make_room(len(data)):
                return False
            self._used += len(data)
        tmp = path.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            path.parent.mkdir(exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError as e:
            logger.warning("L3 directory put %s failed: %s", key, e)
            with self._lock:
                self._used -= len(data)
            try:
                tmp.unlink()
            except OSError:
                pass  # never created, or the folder is gone: nothing to clean
            return False
        return True

    def close(self) -> None:
        self._closed = True


def hash_bucket(key: str) -> int:
    """The sub-folder (0..255) of a key: spreads files over 256 folders."""
    return zlib.crc32(key.encode("utf-8")) & 0xFF


_DIRECTORY_KEYS = {"path", "max_bytes", "when_full"}
# SGLang's MooncakeStoreConfig.load_from_extra_config names, plus local_buffer_size (its own constant there)
_MOONCAKE_KEYS = {"master_server_address", "local_hostname", "metadata_server", "global_segment_size",
                  "local_buffer_size", "protocol", "device_name"}  # fmt: skip
BACKENDS = ("directory", "mooncake")


def parse_size(name: str, value: Any) -> int:
    """A byte size from an int or a string like SGLang's (``"4gb"``, ``"256mb"``, ``"1048576"``)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        s = value.strip().lower()
        for suffix, scale in (("gb", 1 << 30), ("mb", 1 << 20), ("kb", 1 << 10), ("", 1)):
            if s.endswith(suffix) and s[: len(s) - len(suffix)].strip().isdigit():
                size = int(s[: len(s) - len(suffix)]) * scale
                if size > 0:
                    return size
    raise ValueError(f"{name}: expected a positive byte count (int or '<n>[kb|mb|gb]'), got {value!r}")


def backend_from_config(name: str, extra: dict) -> L3Backend:
    """A backend from a name (``directory`` | ``mooncake``) and an extra-config dict (SGLang's flag style)."""
    if not isinstance(extra, dict):
        raise ValueError(f"extra: expected a dict (the extra-config JSON), got {type(extra).__name__}")
    allowed = {"directory": _DIRECTORY_KEYS, "mooncake": _MOONCAKE_KEYS}.get(name)
    if allowed is None:
        raise ValueError(f"L3 backend: expected one of {BACKENDS}, got {name!r}")
    unknown = sorted(set(extra) - allowed)
    if unknown:
        raise ValueError(f"{name} extra config: unknown keys {unknown}, expected keys among {sorted(allowed)}")
    if name == "directory":
        if "path" not in extra:
            raise ValueError(f"directory extra config: expected 'path', got keys {sorted(extra)}")
        max_bytes = extra.get("max_bytes")
        return DirectoryBackend(extra["path"], None if max_bytes is None else parse_size("max_bytes", max_bytes),
                                extra.get("when_full", "evict"))  # fmt: skip
    if "master_server_address" not in extra:
        raise ValueError(f"mooncake extra config: expected 'master_server_address', got keys {sorted(extra)}")
    from kvtc_sglang.tiers.l3_mooncake import DEFAULT_GLOBAL_SEGMENT_BYTES, DEFAULT_LOCAL_BUFFER_BYTES, MooncakeBackend

    return MooncakeBackend(
        extra["master_server_address"],
        local_hostname=extra.get("local_hostname", "127.0.0.1"),
        protocol=extra.get("protocol", "tcp"),
        global_segment_bytes=parse_size("global_segment_size",
                                        extra.get("global_segment_size", DEFAULT_GLOBAL_SEGMENT_BYTES)),
        local_buffer_bytes=parse_size("local_buffer_size", extra.get("local_buffer_size", DEFAULT_LOCAL_BUFFER_BYTES)),
        metadata_server=extra.get("metadata_server", "P2PHANDSHAKE"),
        device_name=extra.get("device_name", ""),
    )  # fmt: skip


def __getattr__(name: str) -> Any:
    if name == "MooncakeBackend":
        from kvtc_sglang.tiers.l3_mooncake import MooncakeBackend

        return MooncakeBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["L3Backend", "DirectoryBackend", "MooncakeBackend", "backend_from_config", "check_key", "parse_size"]
