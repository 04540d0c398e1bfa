"""The KVTC radix cache's asynchronous codec work in one object (as SGLang's ``HiCacheController``): the
encode queue and its worker, the CUDA streams and events, and the fences against SGLang's forward stream.
The tree (:class:`~kvtc_sglang.cache.radix.KVTCRadixCache`) only schedules work here and commits results.

Encoding runs in the background: :meth:`KVTCController.submit` queues the pool rows of some nodes; one
worker thread encodes them (torch ops and zlib release the GIL; on a GPU inside a side stream), and the
tree commits a finished job at a later scheduler tick (:meth:`take_ready`). The scheduler never waits for an
encode except through :meth:`drain` (``reset``, a free of rows still being read, or ``evict`` with nothing
else left to free).

Ordering on a GPU: :mod:`~kvtc_sglang.cache.streams` (:class:`StreamFences`): every pool-row access here runs
on a kvtc stream after events from the forward and schedule streams, and the forward waits on kvtc's events;
the scheduler thread never waits on a stream. A restore reads and checks its blobs after only their puts'
events (its host syncs, the CRC values and nvCOMP's sizes, never wait on the forward in flight), then writes
the pool rows after the forward's fence with no host sync. Encodes run on the worker's stream, inline
encodes on a stream of their own; one nvCOMP codec per stream and thread.

Tensor parallelism: every rank mirrors the tree, so a job is committed only at a point all ranks agree on:
:meth:`take_ready` commits the leading jobs that are finished on every rank, and compares the ranks'
decision digests (:class:`~kvtc_sglang.cache.ranks.RankAgreement`, one collective per scheduler tick;
nothing on one rank).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..codec import KVTCCodec, RawCodec
from ..codec.blob import BlobHeader
from .joint_encode import encode_planned
from .kv_io import PoolKV
from .ranks import DecisionDigest, LocalAgreement
from .stats import KVTCStats
from .store import BlobHandle, BlobStore
from .streams import CudaStreamOps, StreamFences
from .tree_walk import TreeNode

logger = logging.getLogger(__name__)


@dataclass
class EncodeJob:
    """Nodes queued for encoding together: ``targets[i] = (node, node.value at submit, first position)``."""

    seq: int
    targets: list[tuple[TreeNode, torch.Tensor, int]]
    future: Future | None = None
    done_event: Any = None  # torch.cuda.Event recorded on the encode stream after the encode
    results: list[tuple[torch.Tensor, BlobHeader]] = field(default_factory=list)
    references: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)  # verify_restores
    seconds: float = 0.0
    plans: list[Any] = field(default_factory=list)  # joint encoding: a JointPlan per target (None: a plain blob)
    made: dict[int, tuple[torch.Tensor, BlobHeader]] = field(default_factory=dict)  # target -> its new reference

    @property
    def num_tokens(self) -> int:
        return sum(len(slots) for _, slots, _ in self.targets)


VERIFY_TOLERANCE = 1e-2  # max |difference| between a restore and the same blob's decode (both bf16 rows)


__all__ = ["CudaStreamOps", "EncodeJob", "KVTCController"]


class KVTCController:
    """Codec calls, their worker and their streams for one KV pool.

    Args:
        codec: the served model's codec.
        kv: the pool's per-layer buffers.
        stats: the cache's counters (codec seconds on the scheduler thread and on the worker).
        background: encode on a worker thread (the server); ``False`` runs each job when it is submitted
            (tools and tests: deterministic, nothing pending across calls).
        verify: debugging; at each commit, re-encode the node's rows as the device holds them after a full
            synchronize and keep what that decodes to (host copies); check every restore against it.
        agreement: the tensor-parallel ranks' agreement (:mod:`~kvtc_sglang.cache.ranks`; one rank: none).
        stream_ops: the stream API; default: CUDA streams for a pool on a GPU, none on the CPU.
    """

    def __init__(
        self,
        codec: KVTCCodec | RawCodec,
        kv: PoolKV,
        stats: KVTCStats,
        *,
        background: bool = True,
        verify: bool = False,
        agreement: LocalAgreement | None = None,
        stream_ops: CudaStreamOps | None = None,
    ) -> None:
        self.codec = codec
        self.kv = kv
        self.stats = stats
        codec.prepare(kv.device)  # backend and entropy coder made here, not raced by the worker
        self.background = background
        self.verify = verify
        self.agreement = agreement if agreement is not None else LocalAgreement()
        self.digest = DecisionDigest()  # the tree's decisions, compared across ranks at every tick
        ops = stream_ops if stream_ops is not None else (CudaStreamOps() if kv.device.type == "cuda" else None)
        self.fences = StreamFences(kv.device, ops)
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: deque[EncodeJob] = deque()
        self._seq = 0
        self.joint: Any = None  # joint encoding's codec (codec/joint.py JointCodec), set by the factory

    # ----- streams -----

    def bind_forward_stream(self, stream: Any) -> None:
        """See :meth:`StreamFences.bind_forward_stream`."""
        self.fences.bind_forward_stream(stream)

    def forward_stream(self) -> Any:
        return self.fences.forward_stream()

    def put(self, store: BlobStore, blob: torch.Tensor, reserve_bytes: int = 0) -> BlobHandle | None:
        """``store.put(blob, reserve_bytes)`` on the store stream: the reservation (the allocator's free list, the
        page table) after the schedule stream, the rows after the forward's fence too (the pages it borrows may
        have been freed by a batch still in flight); the next batch waits on the put (rule 3), and the handle's
        ``ready`` event orders later reads of the blob. No host sync."""
        f = self.fences
        if f.ops is None:
            return store.put(blob, reserve_bytes)
        issued = f.issued()
        with f.enter("store", issued[-1:]):  # the producer's event: the schedule stream's (the forward's when same)
            plan = store.reserve(blob.numel(), reserve_bytes)
        if plan is None:
            return None
        f.keep("store", blob)
        with f.enter("store", issued):
            handle = store.write(plan, blob)
        ready = f.done("store")
        f.before_forward(ready)
        return replace(handle, ready=ready)

    # ----- encode -----

    @property
    def pending(self) -> int:
        return len(self._jobs)

    @property
    def pending_tokens(self) -> int:
        return sum(job.num_tokens for job in self._jobs)

    def submit(self, targets: list[tuple[TreeNode, torch.Tensor, int]], plans: list[Any] | None = None) -> EncodeJob:
        """Queue an encode of ``(node, slots [T_i] int64, first position)``; the caller keeps the slots
        (and the rows they name) untouched until the job is committed or drained. ``plans``: joint encoding's
        :class:`~kvtc_sglang.cache.joint.JointPlan` per target (None: a plain blob)."""
        if not self.background:
            job = self.encode_now(targets, plans)
        else:
            self._seq += 1
            job = EncodeJob(self._seq, targets, plans=list(plans or []))
            if self._executor is None:
                # On the CPU the worker computes with one torch thread (a per-thread setting): the forward keeps
                # its threads, and the encoder takes what the scheduler's Python leaves idle.
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="kvtc-encode", initializer=self._worker_init
                )
            job.future = self._executor.submit(self._encode, job, "encode", self.fences.issued())
        self._jobs.append(job)
        return job

    def _worker_init(self) -> None:
        if self.kv.device.type == "cpu":
            torch.set_num_threads(1)

    def encode_now(self, targets: list[tuple[TreeNode, torch.Tensor, int]], plans: list[Any] | None = None
                   ) -> EncodeJob:
        """Encode on the calling thread and return the finished job, not queued (tools, tests, inline mode). It
        runs on the inline stream (never the worker's), and every later batch waits on it: its nodes' slots may
        be freed as soon as it returns."""
        self._seq += 1
        job = EncodeJob(self._seq, targets, plans=list(plans or []))
        try:
            self._encode(job, "inline", self.fences.issued())
        except (RuntimeError, ValueError, MemoryError):  # as a worker job's error: no blobs, the nodes stay
            logger.exception("kvtc: an encode of %d tokens on the scheduler thread failed", job.num_tokens)
            job.results = []
        self.fences.before_forward(job.done_event)
        if self.verify and job.results:
            job.references = self._references(job)
        self.stats.scheduler_codec_seconds += job.seconds
        return job

    def _encode(self, job: EncodeJob, stream: str, events: tuple[Any, ...]) -> None:
        t0 = time.perf_counter()
        segments = [(slots, torch.arange(lo, lo + len(slots))) for _, slots, lo in job.targets]
        self.fences.keep(stream, *(slots for _, slots, _ in job.targets))
        plans = job.plans or [None] * len(segments)
        plain = [i for i, p in enumerate(plans) if p is None]
        # a residual's reference blob is read after its put (its bytes are in the store's rows)
        events = (*events, *(p.ready for p in plans if p is not None and p.ready is not None))
        try:
            with self.fences.enter(stream, events):
                # Reads the rows in place (fused Triton kernels on CUDA, gather + torch on CPU); host syncs of the
                # codec (blob sizes, CRC values, headers) block this thread only.
                blobs = self.codec.encode_rows_many(self.kv.k_buffers, self.kv.v_buffers, [segments[i] for i in plain])
                results: list[Any] = [None] * len(segments)
                for i, blob in zip(plain, blobs, strict=True):
                    results[i] = (blob, self.codec.read_header(blob))
                if len(plain) < len(segments):
                    job.made = encode_planned(self.joint, self.kv, segments, plans, results)
                job.results = results
        finally:  # also after an error: the rows it read may be freed once the forward has waited on this
            job.done_event = self.fences.done(stream)
        job.seconds = time.perf_counter() - t0
        if job.future is not None:  # a worker job (its future is set before the worker starts it)
            self.stats.worker_seconds += job.seconds

    def _references(self, job: EncodeJob) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """Debugging (``verify_restores``): what each node's rows, read after a full synchronize (so as the
        forward wrote them), decode to through the codec: a blob whose encode read the rows too early, or a
        restore that wrote them late, differs from it (a blob's own decode would not show the first)."""
        self.fences.synchronize()
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        plans = job.plans or [None] * len(job.targets)
        for (_, slots, lo), plan in zip(job.targets, plans, strict=True):
            if plan is not None:  # a residual decodes through its reference: not this codec's round trip
                out.append(None)
                continue
            k, v = self.kv.gather(slots)  # [L, T, H, D] each
            k2, v2, _ = self.codec.decode(self.codec.encode(k, v, torch.arange(lo, lo + len(slots))))
            out.append((k2.cpu(), v2.cpu()))
        return out

    def _finished(self, job: EncodeJob) -> bool:
        if job.future is not None and not job.future.done():
            return False
        return job.done_event is None or job.done_event.query()

    def take_ready(self) -> list[EncodeJob]:
        """The leading jobs finished (on every rank), in submission order; the caller commits them now. Called
        once per scheduler tick on every rank (a collective under tensor parallelism, which also compares the
        ranks' decision digests).

        A job that raised is returned with no results (its nodes stay as they are), and the error logged."""
        done = 0
        for job in self._jobs:
            if not self._finished(job):
                break
            done += 1
        return self._pop(self.agreement.tick(done, self.digest))

    def wait(self) -> None:
        """Block until the worker has finished every queued job (jobs stay queued). No stream is waited on:
        every later batch waits on the jobs' events, so their rows may be freed from now on (rule 3)."""
        for job in self._jobs:
            if job.future is not None:
                job.future.exception()  # waits for the thread; the error, if any, surfaces in _pop
            self.fences.before_forward(job.done_event)

    def drain(self) -> list[EncodeJob]:
        """Wait for every queued job and return them all (the caller commits them)."""
        self.wait()
        return self._pop(len(self._jobs))

    def _pop(self, count: int) -> list[EncodeJob]:
        out = []
        for _ in range(count):
            job = self._jobs.popleft()
            error = job.future.exception() if job.future is not None else None
            if error is not None:
                logger.error("kvtc: a background encode of %d tokens failed: %r", job.num_tokens, error)
                job.results = []
            self.fences.before_forward(job.done_event)  # its nodes' slots may be freed from now on (rule 3)
            if self.verify and job.results:
                job.references = self._references(job)
            out.append(job)
        return out

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ----- restore -----

    def restore(
        self,
        fetch: Callable[[], list[torch.Tensor]],
        headers: list[BlobHeader],
        targets: list[tuple[torch.Tensor, torch.Tensor]],
        *,
        ready: list[Any] | None = None,
        references: list[tuple | None] | None = None,
        codec: Any = None,
    ) -> None:
        """Decode the blobs ``fetch()`` reads from the store into pool rows ``targets[i] = (slots [T_i] int64,
        positions [T_i])``, one codec call, on the scheduler thread (SGLang's ``init_load_back`` is synchronous).

        On a GPU: the store reads, CRC checks and inflate on the read stream after the blobs' puts only
        (``ready``: their handles' events), then the rows on the load stream after the schedule stream (the
        slots were allocated this tick) and the forward's fence, with no host sync; the next batch waits on both
        whether the restore succeeded or not (the caller frees the slots on failure). Raises ``BlobError`` (its
        ``blob_index`` names the blob) before any row is written. ``codec``: another codec for these blobs (the
        raw sink rows of an L3 object); default the cache's."""
        codec = self.codec if codec is None else codec
        f = self.fences
        t0 = time.perf_counter()
        for slots, positions in targets:
            f.keep("load", slots, positions)
        issued = f.issued()
        try:
            with f.enter("read", ready or []):  # never after the forward: its host syncs wait on the puts only
                payloads = codec.read_blobs(fetch(), headers, targets, self.kv.device)
            f.keep("load", *payloads)
            with f.enter("load", (*issued, f.done("read"))):
                codec.write_rows_many(payloads, headers, self.kv.k_buffers, self.kv.v_buffers, targets)
        finally:  # success or not: the store pages read and the rows written come before the next batch
            f.before_forward(f.done("read"))
            f.before_forward(f.done("load"))
            self.stats.scheduler_codec_seconds += time.perf_counter() - t0
        if references is not None:
            self._check(targets, references)

    def _check(self, targets: list[tuple[torch.Tensor, torch.Tensor]], references: list[tuple | None]) -> None:
        """Debugging (``verify_restores``): restored rows, read on the load stream after the restore, against
        their references (:meth:`_references`). Synchronises with the device; counts ``verified_restores`` and
        ``verify_failures``."""
        with self.fences.enter("load", ()):
            for (slots, _), ref in zip(targets, references, strict=True):
                if ref is None:
                    continue
                k, v = self.kv.gather(slots)  # [L, T, H, D] each
                self.stats.verified_restores += 1
                diff = max(float((a.cpu().float() - b.float()).abs().max()) for a, b in zip((k, v), ref, strict=True))
                if diff > VERIFY_TOLERANCE:
                    self.stats.verify_failures += 1
                    logger.error(
                        "kvtc: a restored node of %d rows differs from its reference by %.3g", len(slots), diff
                    )
