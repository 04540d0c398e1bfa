"""The Mooncake distributed store as an L3 backend (``mooncake.store.MooncakeDistributedStore``, TCP or RDMA).

Each instance is one Mooncake client: it contributes ``global_segment_bytes`` of its memory to the global
store (so every replica adds capacity) and copies objects through a ``local_buffer_bytes`` buffer (an object
larger than it cannot be put). Install: ``pip install --no-deps mooncake-transfer-engine-non-cuda`` and
Debian's ``libibverbs1``; start a master with ``mooncake_master --port 50051``.

What the wheel (0.3.13.post1) does, as checked against a real master: ``setup(...)`` returns 0 on success;
``put`` returns 0, or a negative error code (-900 RPC_FAIL with the master gone, -600 for an object larger than
the local buffer); a put of an existing key returns 0 and keeps the first bytes; ``get`` returns ``b""`` on a
miss and on every error; ``is_exist``/``batch_is_exist`` return 1, 0 or a negative code. With the master
killed, every call returns a failure after 0 to 4.5 s (``put`` and ``batch_is_exist`` mostly ~4.3 s, ``get``
often at once), releasing the GIL while it waits; ``health_check`` keeps returning 0; the client reconnects
to a restarted master by itself (puts work again 0.2 to 1.5 s later; earlier objects are gone). ``close()``
against a dead master blocks 2 to 15 s HOLDING the GIL, and the destructor of an unclosed store about 10 s:
see ``MooncakeBackend.close``.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import threading
import time
from typing import Any

from kvtc_sglang.tiers.l3 import L3Backend, check_data, check_key

logger = logging.getLogger(__name__)

DEFAULT_GLOBAL_SEGMENT_BYTES = 256 << 20
DEFAULT_LOCAL_BUFFER_BYTES = 64 << 20
ERROR_NAMES = {-600: "INVALID_PARAMS", -900: "RPC_FAIL"}
_LOG_EVERY_S = 10.0
_PROBE_TIMEOUT_S = 0.5
# Stores left unclosed because their master was unreachable at close (see ``MooncakeBackend.close``).
_PARKED: list[Any] = []


def _park(store: Any) -> None:
    """Keeps ``store`` alive for the life of the process: one extra reference that nothing releases, so its
    destructor (which would hold the GIL ~10 s retrying the dead master) does not run, not even while the
    interpreter finalizes module globals at exit."""
    _PARKED.append(store)
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(store))


def _load_store_class() -> Any:
    try:
        from mooncake.store import MooncakeDistributedStore
    except ImportError as e:
        raise RuntimeError(
            "the Mooncake backend needs the mooncake wheel: pip install --no-deps "
            f"mooncake-transfer-engine-non-cuda==0.3.13.post1 and apt-get install libibverbs1 ({e})"
        ) from e
    return MooncakeDistributedStore


class MooncakeBackend(L3Backend):
    """One Mooncake store client. ``master``: the master's ``host:port``; ``local_hostname``: this client's
    address (``host`` or ``host:port``) for the transfer engine; ``metadata_server``: ``P2PHANDSHAKE`` (no
    separate metadata service) or an etcd/HTTP address. Raises ``RuntimeError`` when setup fails (at start);
    afterwards calls report failures as values (see the module docstring for Mooncake's error behaviour)."""

    name = "mooncake"

    def __init__(self, master: str, *, local_hostname: str = "127.0.0.1", protocol: str = "tcp",
                 global_segment_bytes: int = DEFAULT_GLOBAL_SEGMENT_BYTES,
                 local_buffer_bytes: int = DEFAULT_LOCAL_BUFFER_BYTES, metadata_server: str = "P2PHANDSHAKE",
                 device_name: str = "", close_timeout_s: float = 3.0) -> None:  # fmt: skip
        for arg, value in (("master", master), ("local_hostname", local_hostname), ("protocol", protocol),
                           ("metadata_server", metadata_server)):  # fmt: skip
            if not isinstance(value, str) or not value:
                raise ValueError(f"{arg}: expected a non-empty str, got {value!r}")
        if ":" not in master:
            raise ValueError(f"master: expected 'host:port', got {master!r}")
        for arg, size in (("global_segment_bytes", global_segment_bytes), ("local_buffer_bytes", local_buffer_bytes)):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"{arg}: expected an int >= 1, got {size!r}")
        if not isinstance(device_name, str):
            raise ValueError(f"device_name: expected a str, got {device_name!r}")
        self.master = master
        self.close_timeout_s = close_timeout_s
        self.local_buffer_bytes = local_buffer_bytes
        self._last_log = 0.0
        store = _load_store_class()()
        rc = store.setup(local_hostname, metadata_server, global_segment_bytes, local_buffer_bytes, protocol,
                         device_name, master)  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"Mooncake setup against master {master}: expected 0, got {self._code(rc)}")
        self._store: Any = store

    @staticmethod
    def _code(rc: int) -> str:
        return f"{rc} ({ERROR_NAMES.get(rc, 'error')})"

    def _log(self, what: str, detail: str) -> None:
        """Warn at most once per ``_LOG_EVERY_S`` (a dead master fails every call)."""
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            logger.warning("Mooncake %s failed (master %s): %s", what, self.master, detail)

    def exists(self, keys: list[str]) -> list[bool]:
        keys = [check_key(k) for k in keys]
        store = self._store
        if store is None or not keys:
            return [False] * len(keys)
        try:
            codes = store.batch_is_exist(keys)
        except RuntimeError as e:
            self._log("batch_is_exist", str(e))
            return [False] * len(keys)
        if any(c < 0 for c in codes):
            self._log("batch_is_exist", f"codes {sorted({self._code(c) for c in codes if c < 0})}")
        return [c == 1 for c in codes]

    def get(self, key: str) -> bytes | None:
        check_key(key)
        store = self._store
        if store is None:
            return None
        try:
            data = store.get(key)
        except RuntimeError as e:
            self._log("get", str(e))
            return None
        # b"" is Mooncake's miss and error value alike; L3 objects are never empty
        return bytes(data) if data else None

    def put(self, key: str, data: bytes) -> bool:
        check_key(key)
        data = check_data(data)
        store = self._store
        if store is None:
            return False
        if len(data) > self.local_buffer_bytes:
            self._log("put", f"{len(data)} bytes, more than the {self.local_buffer_bytes}-byte local buffer")
            return False
        try:
            rc = store.put(key, data)
        except RuntimeError as e:
            self._log("put", str(e))
            return False
        if rc != 0:
            self._log("put", f"code {self._code(rc)}")
        return rc == 0

    def _master_reachable(self) -> bool:
        host, _, port = self.master.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=_PROBE_TIMEOUT_S):
                return True
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        """Unmounts this client's segment. Mooncake's ``close()`` holds the GIL while it retries an unreachable
        master (about 15 s measured, every Python thread frozen), so with the master not accepting connections
        the store is parked instead (never closed nor destroyed: its segment expires at the master, its memory
        goes with the process). Otherwise the close runs on a daemon thread joined for ``close_timeout_s``."""
        store, self._store = self._store, None
        if store is None:
            return
        if not self._master_reachable():
            logger.warning("Mooncake master %s unreachable: leaving the client unclosed (it would block)", self.master)
            _park(store)
            return

        def _close(holder: list) -> None:
            rc = holder[0].close()
            if rc != 0:
                logger.info("Mooncake close: code %s", self._code(rc))
            holder.clear()  # the last reference: the destructor runs here, not on the caller's thread

        t = threading.Thread(target=_close, args=([store],), name="mooncake-close", daemon=True)
        del store
        t.start()
        t.join(self.close_timeout_s)
