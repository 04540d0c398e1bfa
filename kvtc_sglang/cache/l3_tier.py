"""The L3 tier: kvtc blobs of whole token chunks in a store that replicas and restarts share (Mooncake, a
directory), written off the scheduler thread and prefetched before a request is admitted.

**Objects.** Token positions are cut into chunks of ``chunk_tokens`` (``C``); with an L3 the tree cuts its
encode spans at chunk boundaries. When a commit leaves a chunk ``[jC, (j+1)C)`` of a radix path covered by
blobs (and short device parts, the sinks or a chat template's shared head, carried raw:
:mod:`~kvtc_sglang.cache.l3_objects`), that chunk becomes one object, keyed by its hash chain over every token
from position 0 (:mod:`kvtc_sglang.tiers.keys`; SGLang's namespace seed of ``extra_key``/``cache_salt`` first)
and a digest of the calibration, model, KV dtype, codec and tensor-parallel layout, so that any replica, or
this one after a restart, names the same tokens alike and a mismatch misses. Objects are framed with a CRC
and, with a shared secret, an HMAC (:mod:`kvtc_sglang.tiers.frame`, its threat model).

**Writes** (:class:`~kvtc_sglang.cache.l3_writes.L3Writer`), by ``write_policy`` (HiCache's names):
``write_through`` writes a chunk when a commit completes it, ``write_back`` when a blob of it leaves the server
(its node dropped from the store or host memory), so only what would be lost is written, and nothing resident
is shared with other replicas or survives a kill. The scheduler thread only issues copies and queues the
object's build to the client's writer thread; a full queue drops the write (counted): serving never waits for
the store or a stream.

**Reads**: at each scheduler tick, a new waiting request whose prompt has whole chunks beyond what the tree
matches is *parked* (taken out of SGLang's waiting queue) while the client probes the store for the longest
stored prefix of those chunks and fetches it on its reader threads. The tick polls without blocking; when a
prefetch is done (or its deadline passed) the chunks that pass every check (frame, payload, kvtc header:
calibration, positions) are grafted into the tree as compressed nodes with their blobs in host memory, and the
request goes back to the waiting queue, where the match restores them through the one-call restore. Anything
that fails is a miss (counted) and the request prefills.

Tensor parallelism: each rank writes and fetches its own shard's objects (the digest names its rank); the ranks
agree when a parked request is released, how many chunks it grafts and their host charges
(:mod:`~kvtc_sglang.cache.l3_agree`), so their trees stay mirrored.
An abort that names a parked request puts it back in the waiting queue first (:meth:`L3Tier.unpark`, from
the plugin's hook on ``Scheduler.abort_request``), so SGLang's own abort answers it.
"""

from __future__ import annotations

import logging
import os
from array import array
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..codec import BlobError
from ..tiers.frame import FrameError, unpack_object
from ..tiers.keys import KeyScheme, chunk_keys, namespace_seed
from ..tiers.l3_client import L3Client
from .l3_agree import NOT_DONE, agree_charges, agree_prefetches
from .l3_graft import graft_chunks
from .l3_joint import L3References
from .l3_objects import (
    JOINT,
    RAW,
    RefName,
    Segment,
    unpack_segments,
)
from .l3_writes import L3Writer

logger = logging.getLogger(__name__)

REFS = "#refs"  # a parked request's second lookup: the references its chunks' joint segments name
KVTC_KEYS = {"chunk_tokens", "prefetch_timeout_s", "write_queue_depth", "secret_file", "min_chunks", "write_policy"}
WRITE_POLICIES = ("write_through", "write_back")


@dataclass(frozen=True)
class L3Options:
    """The kvtc part of ``--kvtc-l3-config`` (the rest goes to the backend): ``chunk_tokens`` per object (a
    multiple of the page size), ``prefetch_timeout_s`` a parked request waits at most, ``write_queue_depth``
    queued writes before they are dropped, ``secret_file`` holding the shared MAC secret (or the
    ``KVTC_L3_SECRET`` environment variable), ``min_chunks`` a prompt needs beyond the match to be parked,
    ``write_policy`` when a chunk is written (``write_through``: at the commit that completes it;
    ``write_back``: when a blob of it leaves the server)."""

    chunk_tokens: int = 128
    prefetch_timeout_s: float = 2.0
    write_queue_depth: int = 64
    secret_file: str = ""
    min_chunks: int = 1
    write_policy: str = "write_through"

    def __post_init__(self) -> None:
        if self.write_policy not in WRITE_POLICIES:
            raise ValueError(f"l3 write_policy must be one of {WRITE_POLICIES}, got {self.write_policy!r}")
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


class L3Tier:
    """The L3 tier of one cache: the cache owns it, calls ``writer.committed`` at commits, ``writer.dropping``
    before a subtree leaves, :meth:`tick` at ticks and :meth:`unpark` at aborts.

    Args:
        cache: the tree (its ``surgery``, ``io``, ``ctl``, ``codec``, ``policy`` are used; :mod:`l3_graft` grafts).
        client: the store's asynchronous client.
        scheme: chunk size and digest of this deployment's keys.
        options: the kvtc options of the L3.
        raw_codec: codes the raw segments (short device parts: the sinks, a shared template head).
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
        self._parked: dict[str, tuple[Any, np.ndarray, int, int]] = {}  # rid -> (req, tokens, first, chunks asked)
        # rid -> (checked chunks, timed out, their keys): finished on this rank, not yet agreed
        self._fetched: dict[str, tuple[list[list[tuple]], bool, list[str]]] = {}
        self._seen: set[str] = set()
        book = cache.io.joint
        self.references = None if book is None else L3References(book, cache.ctl.joint, scheme, self.secret)
        # rid -> (checked chunks, timed out, their keys, the references they name): waiting for the references
        self._naming: dict[str, tuple[list[list[tuple]], bool, list[str], dict[str, RefName]]] = {}
        self._got: dict[str, dict[str, tuple[torch.Tensor, Any]]] = {}  # rid -> fetched references, checked
        self.writer = L3Writer(cache, client, scheme, write_policy=options.write_policy, secret=self.secret,
                               raw_codec=raw_codec, references=self.references)

    # ----- reads -----

    def tick(self, waiting: list | None) -> None:
        """Graft finished prefetches and return their requests; park new waiting requests with chunks to ask."""
        for result in self.client.poll():
            if result.request_id.endswith(REFS):
                self._named(result)
                continue
            parked = self._parked.get(result.request_id)
            if parked is not None:
                chunks = self._chunks(parked[2], result.keys, result.objects)
                missing = self.references.missing(chunks) if self.references is not None else []
                if missing:  # a second lookup: the references named by joint segments that the book lacks
                    names = {seg[5].key: seg[5] for chunk in chunks for seg in chunk if seg[0] == JOINT}
                    self._naming[result.request_id] = (chunks, result.timed_out, result.keys, names)
                    self.client.lookup(result.request_id + REFS, missing)
                else:
                    self._fetched[result.request_id] = (chunks, result.timed_out, result.keys)
        if self._parked:
            self._release(waiting)
        if waiting:
            for req in [r for r in waiting if r.rid not in self._seen]:
                self._seen.add(req.rid)
                if self._park(req):
                    waiting.remove(req)
        if len(self._seen) > 4096:
            self._seen = {r.rid for r in waiting or []} | set(self._parked)

    def _named(self, result: Any) -> None:
        """The references a parked request's chunks name came back: the chunks up to the first one naming a
        reference that is neither held nor fetched and checked are the prefetch's result."""
        rid = result.request_id[: -len(REFS)]
        if rid not in self._naming or self.references is None:
            return
        chunks, timed_out, keys, names = self._naming.pop(rid)
        got, refused = self.references.checked(names, result.keys, result.objects)
        self.cache.stats.l3_rejected += refused
        n = self.references.usable(chunks, set(got) | set(self.references.book.by_key))
        if n < len(chunks):
            logger.warning("kvtc: L3 chunks of %s name %d reference(s) missing or refused: %d of %d chunks used", rid,
                           len(names) - len(got), n, len(chunks))  # fmt: skip
        self._got[rid] = got
        self._fetched[rid] = (chunks[:n], timed_out or result.timed_out, keys)

    def _release(self, waiting: list | None) -> None:
        """Requests whose prefetch every rank has finished go back to the queue with the chunks agreed
        (:mod:`~kvtc_sglang.cache.l3_agree`)."""
        rids = list(self._parked)
        fetched = [self._fetched[r][0] if r in self._fetched else None for r in rids]
        verdicts = agree_prefetches(self.cache.ctl.agreement,
                                    [(self._parked[r][3], f) for r, f in zip(rids, fetched, strict=True)])  # fmt: skip
        for rid, n in zip(rids, verdicts, strict=True):
            if n == NOT_DONE:
                continue
            req, tokens, _, _ = self._parked.pop(rid)
            chunks, timed_out, keys = self._fetched.pop(rid)
            got = self._got.pop(rid, {})
            if n:
                self._graft(req, tokens, [seg for chunk in chunks[:n] for seg in chunk], got)
                for key in [*keys[:n], *got]:
                    self.writer.remember(key)  # in the store already: a drop under write-back need not write it
            if timed_out:
                self.cache.stats.l3_prefetch_timeouts += 1
            if waiting is not None:
                waiting.insert(0, req)

    def unpark(self, rid: str, every: bool, waiting: list | None) -> int:
        """An abort names these requests (SGLang's match: ``rid`` a prefix of theirs; ``every``: all): parked
        ones go back to ``waiting``, their prefetch forgotten, where SGLang's abort finds and answers them.
        Aborts reach every tensor-parallel rank alike. Returns how many were parked."""
        hit = [r for r in self._parked if every or r.startswith(rid)]
        for r in hit:
            req = self._parked.pop(r)[0]
            self._fetched.pop(r, None)
            self._got.pop(r, None)
            self.client.cancel(r)
            if self._naming.pop(r, None) is not None:
                self.client.cancel(r + REFS)
            if waiting is not None:
                waiting.append(req)
        return len(hit)

    def _key_of(self, req: Any, tokens: np.ndarray) -> Any:
        from sglang.srt.mem_cache.radix_cache import RadixKey

        return RadixKey(token_ids=array("q", tokens.tolist()), extra_key=req.extra_key, cache_salt=req.cache_salt)

    def _park(self, req: Any) -> bool:
        if getattr(req, "is_retracted", False) or len(getattr(req, "output_ids", ())):
            return False
        tokens = np.asarray(req.origin_input_ids, dtype=np.int64)
        usable = (len(tokens) - 1) // self.chunk  # SGLang matches at most input - 1 tokens
        if usable < 1:
            return False
        key = self._key_of(req, tokens[: usable * self.chunk])
        device_len, _, host_len, _ = self.cache.surgery.match(key.page_aligned(self.cache.page_size), split=False)
        first = (device_len + host_len) // self.chunk
        if usable - first < self.options.min_chunks:
            return False
        seed = namespace_seed(req.extra_key, req.cache_salt)
        keys = chunk_keys(tokens[: usable * self.chunk], self.scheme, start_chunk=0, prev_hash=seed)
        self.client.lookup(req.rid, keys[first:])
        self._parked[req.rid] = (req, tokens[: usable * self.chunk], first, usable - first)
        self.cache.stats.l3_parked += 1
        return True

    def _chunks(self, first: int, keys: list[str], objects: list[bytes]) -> list[list[tuple]]:
        """The leading fetched objects that pass every check, as checked segments per chunk (the first failure
        and everything after it are a miss)."""
        c, out = self.chunk, []
        for i, (key, data) in enumerate(zip(keys, objects, strict=True)):
            lo = (first + i) * c
            try:
                payload = unpack_object(data, key=key, digest=self.scheme.digest, start=lo, num_tokens=c,
                                        secret=self.secret)  # fmt: skip
                out.append([self._checked(seg) for seg in unpack_segments(payload, lo, lo + c)])
            except (FrameError, BlobError, ValueError) as e:
                self.cache.stats.l3_rejected += 1
                logger.warning("kvtc: L3 object %s refused (%s): a miss, the request prefills from there", key, e)
                break
        return out

    def _graft(self, req: Any, tokens: np.ndarray, items: list[tuple], got: dict[str, tuple]) -> None:
        """Graft the agreed segments, each blob (and each fetched reference) charged the ranks' largest size."""
        blobs = [it[3].numel() if it[0] != RAW else 0 for it in items]
        refs = [got[it[5].key][0].numel() if it[0] == JOINT and it[5].key in got else 0 for it in items]
        sizes = agree_charges(self.cache.ctl.agreement, blobs + refs)
        charges = list(zip(sizes[: len(items)], sizes[len(items) :], strict=True))  # (blob, adopted reference)
        pinned: list[int] = []
        link = None if self.references is None else self.references.linker(self.cache, got, pinned)
        try:
            grafted = graft_chunks(self.cache, self._key_of(req, tokens), items, self.raw_codec, charges, link=link)
        finally:
            for ref_id in pinned:
                self.cache.io.joint.unpin(ref_id)  # an adopted reference no blob came to depend on goes
        self.cache.stats.l3_hits += grafted[0]
        self.cache.stats.l3_hit_tokens += grafted[1]

    def _checked(self, seg: Segment) -> tuple:
        """``(kind, lo, hi, blob [n] uint8 CPU, header)`` of a segment whose blob names this deployment's codec
        (calibration) and exactly its positions (a joint segment: ``+ (its reference's RefName,)``, the residual
        calibration's header); ``BlobError``/``ValueError`` otherwise."""
        name = None
        if seg.kind == JOINT:
            if self.references is None:
                raise ValueError("the object holds a joint-encoding residual; this server runs without "
                                 "--kvtc-joint-calibration")  # fmt: skip
            name, blob, header = self.references.residual(seg.data)
        else:
            header = (self.raw_codec if seg.kind == RAW else self.cache.codec).read_header(seg.data)
            blob = torch.frombuffer(bytearray(seg.data), dtype=torch.uint8)
        if header.num_tokens != seg.hi - seg.lo or int(header.positions[0]) != seg.lo:
            raise ValueError(f"blob positions {int(header.positions[0])}+{header.num_tokens}, expected "
                             f"{seg.lo}+{seg.hi - seg.lo}")  # fmt: skip
        return (seg.kind, seg.lo, seg.hi, blob, header) + ((name,) if name is not None else ())

    def counters(self) -> dict[str, float]:
        c = self.client.counters
        return {"l3_put_objects": c.put_objects, "l3_put_bytes": c.put_bytes, "l3_put_dropped": c.put_dropped,
                "l3_put_failed": c.put_failed, "l3_get_objects": c.get_objects, "l3_get_bytes": c.get_bytes,
                "l3_get_errors": c.get_errors, "l3_get_seconds": c.get_seconds, "l3_put_seconds": c.put_seconds}

    def close(self) -> None:
        self.client.close()
