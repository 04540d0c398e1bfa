"""The L3 tier: kvtc blobs of whole token chunks in a store that replicas and restarts share (Mooncake, a
directory), written off the scheduler thread and prefetched before a request is admitted.

**Objects.** Token positions are cut into chunks of ``chunk_tokens`` (``C``); when an L3 is configured the
tree cuts its encode spans at chunk boundaries, so a committed blob that covers a whole chunk
``[max(jC, sink_end), (j+1)C)`` becomes one object, keyed by the chunk's hash chain over every token from
position 0 (:mod:`kvtc_sglang.tiers.keys`; SGLang's namespace seed of ``extra_key``/``cache_salt`` first) and
a digest of the calibration, model, KV dtype, codec and tensor-parallel layout, so that any replica, or this
one after a restart, names the same tokens alike and a mismatch misses. Chunk 0 also carries the sinks' rows
raw (:class:`~kvtc_sglang.codec.RawCodec`): a replica with an empty tree can start from it. Objects are
framed with a CRC and, with a shared secret, an HMAC (:mod:`kvtc_sglang.tiers.frame`, its threat model).

**Writes** (write-through at commit): the object is built on the scheduler thread from bytes already on the
host (on a GPU, a copy on kvtc's host stream after the encode's event, which has fired by commit) and queued
to the client's writer thread; a full queue drops the write (counted): serving never waits for the store.

**Reads**: at each scheduler tick, a new waiting request whose prompt has whole chunks beyond what the tree
matches is *parked* (taken out of SGLang's waiting queue) while the client probes the store for the longest
stored prefix of those chunks and fetches it on its reader threads. The tick polls without blocking; when a
prefetch is done (or its deadline passed) the chunks that pass every check (frame, payload, kvtc header:
calibration, positions) are grafted into the tree as compressed nodes with their blobs in host memory, and the
request goes back to the waiting queue, where the match restores them through the one-call restore. Anything
that fails is a miss (counted) and the request prefills.

Limits: one tensor-parallel rank (``refused_tp``); a request aborted while parked is answered when it returns.
"""

from __future__ import annotations

import logging
import os
import struct
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..codec import BlobError
from ..tiers.frame import FrameError, pack_object, unpack_object
from ..tiers.keys import KeyScheme, chunk_keys, namespace_seed
from ..tiers.l3_client import L3Client
from .tree_walk import TreeNode

logger = logging.getLogger(__name__)

_PAYLOAD = struct.Struct("<4sI")  # magic, bytes of the raw sink blob (0 after chunk 0); then the kvtc blob
_PAYLOAD_MAGIC = b"KVP1"
KVTC_KEYS = {"chunk_tokens", "prefetch_timeout_s", "write_queue_depth", "secret_file", "min_chunks"}


@dataclass(frozen=True)
class L3Options:
    """The kvtc part of ``--kvtc-l3-config`` (the rest goes to the backend): ``chunk_tokens`` per object (a
    multiple of the page size), ``prefetch_timeout_s`` a parked request waits at most, ``write_queue_depth``
    queued writes before they are dropped, ``secret_file`` holding the shared MAC secret (or the
    ``KVTC_L3_SECRET`` environment variable), ``min_chunks`` a prompt needs beyond the match to be parked."""

    chunk_tokens: int = 256
    prefetch_timeout_s: float = 2.0
    write_queue_depth: int = 64
    secret_file: str = ""
    min_chunks: int = 1

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "write_queue_depth", "min_chunks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"l3 {name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.prefetch_timeout_s, int | float) or not self.prefetch_timeout_s > 0:
            raise ValueError(f"l3 prefetch_timeout_s must be > 0 seconds, got {self.prefetch_timeout_s!r}")

    def secret(self) -> bytes | None:
        if self.secret_file:
            with open(self.secret_file, "rb") as f:
                data = f.read().strip()
            if not data:
                raise ValueError(f"l3 secret_file {self.secret_file} is empty")
            return data
        env = os.environ.get("KVTC_L3_SECRET", "")
        return env.encode() if env else None


def split_options(extra: dict) -> tuple[L3Options, dict]:
    """``(kvtc's options, the backend's extra config)`` of one ``--kvtc-l3-config`` dict."""
    if not isinstance(extra, dict):
        raise ValueError(f"--kvtc-l3-config must be a JSON object, got {type(extra).__name__}")
    ours = {k: v for k, v in extra.items() if k in KVTC_KEYS}
    return L3Options(**ours), {k: v for k, v in extra.items() if k not in KVTC_KEYS}


def pack_payload(raw: bytes, blob: bytes) -> bytes:
    return _PAYLOAD.pack(_PAYLOAD_MAGIC, len(raw)) + raw + blob


def unpack_payload(data: bytes) -> tuple[bytes, bytes]:
    """``(raw sink blob, kvtc blob)``; ``ValueError`` when it is not a payload of this format."""
    if len(data) < _PAYLOAD.size:
        raise ValueError(f"L3 payload of {len(data)} bytes, expected at least {_PAYLOAD.size}")
    magic, n = _PAYLOAD.unpack_from(data)
    if magic != _PAYLOAD_MAGIC or _PAYLOAD.size + n > len(data):
        raise ValueError(f"L3 payload magic {magic!r} / raw part {n} bytes of {len(data)}, expected {_PAYLOAD_MAGIC!r}")
    return data[_PAYLOAD.size : _PAYLOAD.size + n], data[_PAYLOAD.size + n :]


def path_tokens(node: TreeNode) -> tuple[np.ndarray, Any]:
    """``(token ids from position 0 to the end of node [depth] int64, the root child's RadixKey)``."""
    parts, up, key = [], node, node.key
    while up is not None and up.parent is not None:
        parts.append(np.asarray(up.key.token_ids[: len(up.key)], dtype=np.int64))
        key = up.key
        up = up.parent
    return (np.concatenate(parts[::-1]) if parts else np.zeros(0, np.int64)), key


def path_slots(node: TreeNode, end: int) -> torch.Tensor | None:
    """Slots of the first ``end`` tokens of ``node``'s path, ``None`` if any of them has no slots."""
    path = []
    up = node
    while up is not None and up.parent is not None:
        path.append(up)
        up = up.parent
    out, have = [], 0
    for n in reversed(path):
        if have >= end:
            break
        if n.value is None:
            return None
        out.append(n.value[: end - have])
        have += min(len(n.key), end - have)
    return torch.cat(out) if out and have >= end else None


class L3Tier:
    """The L3 tier of one cache (the cache owns it and calls :meth:`offer` at commits and :meth:`tick` at ticks).

    Args:
        cache: the tree (its ``_match``, ``graft_chunks``, ``io``, ``ctl``, ``codec``, ``policy`` are used).
        client: the store's asynchronous client.
        scheme: chunk size and digest of this deployment's keys.
        options: the kvtc options of the L3.
        raw_codec: codes the sinks' rows of chunk 0.
    """

    def __init__(self, cache: Any, client: L3Client, scheme: KeyScheme, options: L3Options, raw_codec: Any) -> None:
        if scheme.chunk_tokens % cache.page_size or scheme.chunk_tokens <= cache.policy.sink_end:
            raise ValueError(
                f"l3 chunk_tokens must be a multiple of the page size {cache.page_size} above the sinks "
                f"({cache.policy.sink_end} tokens), got {scheme.chunk_tokens}"
            )
        self.cache = cache
        self.client = client
        self.scheme = scheme
        self.options = options
        self.secret = options.secret()
        self.raw_codec = raw_codec
        self.chunk = scheme.chunk_tokens
        self._parked: dict[str, tuple[Any, np.ndarray, int]] = {}  # rid -> (req, tokens, first chunk asked)
        self._seen: set[str] = set()

    # ----- writes -----

    def offer(self, node: TreeNode, start: int, num_tokens: int, blob: torch.Tensor) -> bool:
        """Queue the object of a blob committed for ``node`` (positions ``[start, start + num_tokens)``) if it
        covers a whole chunk; ``True`` when queued."""
        c, sink_end = self.chunk, self.cache.policy.sink_end
        end = start + num_tokens
        j = end // c - 1
        if end % c or j < 0 or start != max(j * c, sink_end):
            return False
        tokens, head = path_tokens(node)
        if len(tokens) != end:
            return False
        raw = b""
        if j == 0:
            slots = path_slots(node, sink_end)
            if slots is None:
                return False
            raw = self._raw_rows(slots)
        seed = namespace_seed(head.extra_key, getattr(head, "cache_salt", None))
        key = chunk_keys(tokens, self.scheme, start_chunk=0, prev_hash=seed)[j]
        data = blob.detach().to("cpu").numpy().tobytes()  # at commit the encode has finished (its event fired)
        obj = pack_object(pack_payload(raw, data), key=key, digest=self.scheme.digest, start=j * c,
                          num_tokens=c, secret=self.secret)  # fmt: skip
        queued = self.client.put_async(key, obj)
        self.cache.stats.l3_offered += 1
        return queued

    def _raw_rows(self, slots: torch.Tensor) -> bytes:
        """The sinks' rows as a raw blob (read on the inline stream after the forward's fence)."""
        ctl = self.cache.ctl
        kv = ctl.kv
        with ctl.fences.enter("inline", ctl.fences.issued()):
            [blob] = self.raw_codec.encode_rows_many(kv.k_buffers, kv.v_buffers, [(slots, torch.arange(len(slots)))])
            data = blob.to("cpu").numpy().tobytes()
        ctl.fences.before_forward(ctl.fences.done("inline"))
        return data

    # ----- reads -----

    def tick(self, waiting: list | None) -> None:
        """Graft finished prefetches and return their requests; park new waiting requests with chunks to ask."""
        for result in self.client.poll():
            parked = self._parked.pop(result.request_id, None)
            if parked is None:
                continue
            req, tokens, first = parked
            if result.objects:
                self._graft(req, tokens, first, result.keys, result.objects)
            if result.timed_out:
                self.cache.stats.l3_prefetch_timeouts += 1
            if waiting is not None:
                waiting.insert(0, req)
        if waiting:
            for req in [r for r in waiting if r.rid not in self._seen]:
                self._seen.add(req.rid)
                if self._park(req):
                    waiting.remove(req)
        if len(self._seen) > 4096:
            self._seen = {r.rid for r in waiting or []} | set(self._parked)

    def _key_of(self, req: Any, tokens: np.ndarray) -> Any:
        from sglang.srt.mem_cache.radix_cache import RadixKey

        return RadixKey(token_ids=array("q", tokens.tolist()), extra_key=req.extra_key, cache_salt=req.cache_salt)

    def _park(self, req: Any) -> bool:
        if getattr(req, "is_retracted", False) or len(getattr(req, "output_ids", ())) or self.client is None:
            return False
        tokens = np.asarray(req.origin_input_ids, dtype=np.int64)
        usable = (len(tokens) - 1) // self.chunk  # SGLang matches at most input - 1 tokens
        if usable < 1:
            return False
        key = self._key_of(req, tokens[: usable * self.chunk])
        device_len, _, host_len, _ = self.cache._match(key.page_aligned(self.cache.page_size), split=False)
        first = (device_len + host_len) // self.chunk
        if usable - first < self.options.min_chunks:
            return False
        seed = namespace_seed(req.extra_key, req.cache_salt)
        keys = chunk_keys(tokens[: usable * self.chunk], self.scheme, start_chunk=0, prev_hash=seed)
        self.client.lookup(req.rid, keys[first:])
        self._parked[req.rid] = (req, tokens[: usable * self.chunk], first)
        self.cache.stats.l3_parked += 1
        return True

    def _graft(self, req: Any, tokens: np.ndarray, first: int, keys: list[str], objects: list[bytes]) -> None:
        c, sink_end, stats = self.chunk, self.cache.policy.sink_end, self.cache.stats
        pieces = []
        for i, (key, data) in enumerate(zip(keys, objects, strict=True)):
            j = first + i
            lo = max(j * c, sink_end)
            try:
                raw, blob = unpack_payload(unpack_object(data, key=key, digest=self.scheme.digest, start=j * c,
                                                         num_tokens=c, secret=self.secret))  # fmt: skip
                header = self.cache.codec.read_header(blob)
                if header.num_tokens != (j + 1) * c - lo or int(header.positions[0]) != lo:
                    raise ValueError(f"blob positions {int(header.positions[0])}+{header.num_tokens}, "
                                     f"expected {lo}+{(j + 1) * c - lo}")  # fmt: skip
                raw_header = self.raw_codec.read_header(raw) if j == 0 else None
                if raw_header is not None and raw_header.num_tokens != sink_end:
                    raise ValueError(f"sink rows for {raw_header.num_tokens} tokens, expected {sink_end}")
            except (FrameError, BlobError, ValueError) as e:
                stats.l3_rejected += 1
                logger.warning("kvtc: L3 object %s refused (%s): a miss, the request prefills", key, e)
                break
            pieces.append((j, torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else None, raw_header,
                           torch.frombuffer(bytearray(blob), dtype=torch.uint8), header))
        if pieces:
            grafted = self.cache.graft_chunks(self._key_of(req, tokens), pieces, c, self.raw_codec)
            stats.l3_hits += grafted[0]
            stats.l3_hit_tokens += grafted[1]

    def counters(self) -> dict[str, float]:
        c = self.client.counters
        return {"l3_put_objects": c.put_objects, "l3_put_bytes": c.put_bytes, "l3_put_dropped": c.put_dropped,
                "l3_put_failed": c.put_failed, "l3_get_objects": c.get_objects, "l3_get_bytes": c.get_bytes,
                "l3_get_errors": c.get_errors, "l3_get_seconds": c.get_seconds, "l3_put_seconds": c.put_seconds}

    def close(self) -> None:
        self.client.close()
