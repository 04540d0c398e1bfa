"""The KVTC radix cache's asynchronous codec work in one object (as SGLang's ``HiCacheController``): the
encode queue and its worker, the CUDA streams and events, and the fences against SGLang's forward stream.
The tree (:class:`~kvtc_sglang.cache.radix.KVTCRadixCache`) only schedules work here and commits results.

Encoding runs in the background: :meth:`KVTCController.submit` queues the pool rows of some nodes; one
worker thread encodes them (torch ops and zlib release the GIL; on a GPU inside a side stream), and the
tree commits a finished job at a later scheduler tick (:meth:`take_ready`). The scheduler never waits for an
encode except through :meth:`drain` (``reset``, a free of rows still being read, or ``evict`` with nothing
else left to free).

Ordering on a GPU (SGLang's overlap scheduler lets a forward still write slots the scheduler has already
freed, and the paged allocator hands the newest pages out first), two rules, no host sync:

1. every pool-row read or write of ours waits on the forward stream first (an event recorded on it when
   the work is issued): encodes on the worker's side stream, blob puts on the store stream, restores on
   the load stream;
2. the forward stream waits on our work before any later batch once that work's rows may be used or
   reused: restores before the batch that reads them, puts before the pages could be freed, an encode
   before its nodes' slots can be freed (it is committed only once its event has completed).

On the CPU every op completes in order on the calling thread: streams and events are absent, and the
rules hold by construction (the worker thread only reads rows the tree keeps until the job is committed).

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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from ..codec import KVTCCodec
from ..codec.blob import BlobHeader
from .kv_io import PoolKV
from .ranks import DecisionDigest, LocalAgreement
from .stats import KVTCStats
from .store import BlobHandle, BlobStore
from .tree_walk import TreeNode

logger = logging.getLogger(__name__)


@dataclass
class EncodeJob:
    """Nodes queued for encoding together: ``targets[i] = (node, node.value at submit, first position)``."""

    seq: int
    targets: list[tuple[TreeNode, torch.Tensor, int]]
    future: Future | None = None
    done_event: Any = None  # torch.cuda.Event recorded on the side stream after the encode
    results: list[tuple[torch.Tensor, BlobHeader]] = field(default_factory=list)
    references: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)  # verify_restores
    seconds: float = 0.0

    @property
    def num_tokens(self) -> int:
        return sum(len(slots) for _, slots, _ in self.targets)


VERIFY_TOLERANCE = 1e-2  # max |difference| between a restore and the same blob's decode (both bf16 rows)


def _keep_for(stream: Any, *tensors: torch.Tensor) -> None:
    """Tell torch's caching allocator that ``stream`` uses these tensors (made on another stream)."""
    for t in tensors:
        if t.is_cuda:
            t.record_stream(stream)


class CudaStreamOps:
    """The stream API the controller uses (torch's CUDA streams); tests pass a recording stand-in."""

    def stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    def event(self) -> Any:
        return torch.cuda.Event()

    def current(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def use(self, stream: Any) -> AbstractContextManager:
        return torch.cuda.stream(stream)


class KVTCController:
    """Codec calls, their worker and their streams for one KV pool.

    Args:
        codec: the served model's codec.
        kv: the pool's per-layer buffers.
        stats: the cache's counters (codec seconds on the scheduler thread and on the worker).
        background: encode on a worker thread (the server); ``False`` runs each job when it is submitted
            (tools and tests: deterministic, nothing pending across calls).
        verify: keep what each blob decodes to (host copies) and check restored rows against it.
        agreement: the tensor-parallel ranks' agreement (:mod:`~kvtc_sglang.cache.ranks`; one rank: none).
        stream_ops: the stream API; default: CUDA streams for a pool on a GPU, none on the CPU.
    """

    def __init__(
        self,
        codec: KVTCCodec,
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
        self.ops = stream_ops if stream_ops is not None else (CudaStreamOps() if kv.device.type == "cuda" else None)
        self._forward_stream: Any = None  # SGLang's forward stream (bound by the plugin at the first tick)
        self._side = self._store = self._load = None
        if self.ops is not None:
            self._side = self.ops.stream(kv.device)  # background encodes
            self._store = self.ops.stream(kv.device)  # blob puts
            self._load = self.ops.stream(kv.device)  # restores
        self._executor: ThreadPoolExecutor | None = None
        self._jobs: deque[EncodeJob] = deque()
        self._seq = 0

    # ----- streams and fences -----

    def bind_forward_stream(self, stream: Any) -> None:
        """SGLang's forward stream (``Scheduler.forward_stream`` under the overlap scheduler); ``None``: the
        forward runs on the scheduler's current stream (the normal loop), taken now, on the scheduler thread."""
        if self.ops is not None:
            self._forward_stream = stream if stream is not None else self.ops.current(self.kv.device)

    def forward_stream(self) -> Any:
        """The forward stream (unbound: the calling thread's current stream; only the scheduler thread asks)."""
        if self.ops is None:
            return None
        return self._forward_stream if self._forward_stream is not None else self.ops.current(self.kv.device)

    def new_event(self, stream: Any) -> Any:
        """An event recorded on ``stream`` now (``None`` on the CPU)."""
        if self.ops is None:
            return None
        event = self.ops.event()
        event.record(stream)
        return event

    def fence_event(self) -> Any:
        """An event on the forward stream after everything issued on it so far (``None`` on the CPU)."""
        return self.new_event(self.forward_stream())

    def before_forward(self, event: Any) -> None:
        """Make every later batch of the forward stream wait on ``event`` (rule 2; no host sync)."""
        if event is not None:
            self.forward_stream().wait_event(event)

    def on_stream(self, stream: Any, fence: Any) -> AbstractContextManager:
        """Run the block on ``stream`` after ``fence`` (rule 1); a no-op context on the CPU."""
        if self.ops is None or stream is None:
            return nullcontext()
        stream.wait_event(fence)
        return self.ops.use(stream)

    def put(self, store: BlobStore, blob: torch.Tensor, reserve_bytes: int = 0) -> BlobHandle | None:
        """``store.put(blob, reserve_bytes)`` on the store stream after the forward stream (rule 1), ordered
        before the next batch (rule 2): the pages it borrows may have been freed by a batch still in flight."""
        if self.ops is None:
            return store.put(blob, reserve_bytes)
        with self.on_stream(self._store, self.fence_event()):
            handle = store.put(blob, reserve_bytes)
        _keep_for(self._store, blob)
        self.before_forward(self.new_event(self._store))
        return handle

    # ----- encode -----

    @property
    def pending(self) -> int:
        return len(self._jobs)

    @property
    def pending_tokens(self) -> int:
        return sum(job.num_tokens for job in self._jobs)

    def submit(self, targets: list[tuple[TreeNode, torch.Tensor, int]]) -> EncodeJob:
        """Queue an encode of ``(node, slots [T_i] int64, first position)``; the caller keeps the slots
        (and the rows they name) untouched until the job is committed or drained."""
        if not self.background:
            job = self.encode_now(targets)
        else:
            self._seq += 1
            job = EncodeJob(self._seq, targets)
            if self._executor is None:
                # On the CPU the worker computes with one torch thread (a per-thread setting): the forward keeps
                # its threads, and the encoder takes what the scheduler's Python leaves idle.
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="kvtc-encode", initializer=self._worker_init
                )
            job.future = self._executor.submit(self._encode, job, self.fence_event())
        self._jobs.append(job)
        return job

    def _worker_init(self) -> None:
        if self.kv.device.type == "cpu":
            torch.set_num_threads(1)

    def encode_now(self, targets: list[tuple[TreeNode, torch.Tensor, int]]) -> EncodeJob:
        """Encode on the calling thread and return the finished job, not queued (tools, tests, inline mode)."""
        self._seq += 1
        job = EncodeJob(self._seq, targets)
        try:
            self._encode(job, self.fence_event())
        except (RuntimeError, ValueError, MemoryError):  # as a worker job's error: no blobs, the nodes stay
            logger.exception("kvtc: an encode of %d tokens on the scheduler thread failed", job.num_tokens)
            job.results = []
        self.stats.scheduler_codec_seconds += job.seconds
        return job

    def _encode(self, job: EncodeJob, fence: Any) -> None:
        t0 = time.perf_counter()
        segments = [(slots, torch.arange(lo, lo + len(slots))) for _, slots, lo in job.targets]
        with self.on_stream(self._side, fence):
            # Reads the rows in place (fused Triton kernels on CUDA, gather + torch on CPU); host syncs of the
            # codec (blob sizes, CRC values, headers) block this thread only.
            blobs = self.codec.encode_rows_many(self.kv.k_buffers, self.kv.v_buffers, segments)
            job.results = [(blob, self.codec.read_header(blob)) for blob in blobs]
            if self.verify:  # debugging: what each blob decodes to now is what its restore must write
                for blob in blobs:
                    k, v, _ = self.codec.decode(blob)
                    job.references.append((k.cpu(), v.cpu()))
            job.done_event = self.new_event(self._side)
        job.seconds = time.perf_counter() - t0
        if job.future is not None:  # a worker job (its future is set before the worker starts it)
            self.stats.worker_seconds += job.seconds

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
        """Block until every queued job has read its rows (jobs stay queued; the blocking path)."""
        for job in self._jobs:
            if job.future is not None:
                job.future.exception()  # waits; the error, if any, surfaces in _pop
            if job.done_event is not None:
                job.done_event.synchronize()

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
            self.before_forward(job.done_event)  # its nodes' slots may be freed from now on (rule 2)
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
        references: list[tuple | None] | None = None,
    ) -> None:
        """Decode the blobs ``fetch()`` reads from the store into pool rows ``targets[i] = (slots [T_i] int64,
        positions [T_i])``, one codec call, on the scheduler thread (SGLang's ``init_load_back`` is synchronous).

        On a GPU the store reads and the decode run on the load stream after the forward stream (rule 1) and
        the next batch waits for them (rule 2); the only host copy is the batch's CRC values. Raises
        ``BlobError`` (its ``blob_index`` names the blob) before any row is written."""
        t0 = time.perf_counter()
        for slots, positions in targets:
            _keep_for(self._load, slots, positions)
        try:
            with self.on_stream(self._load, self.fence_event()):
                blobs = fetch()
                self.codec.decode_rows_many(blobs, self.kv.k_buffers, self.kv.v_buffers, targets, headers=headers)
                event = self.new_event(self._load)
            self.before_forward(event)
        finally:
            self.stats.scheduler_codec_seconds += time.perf_counter() - t0
        if references is not None:
            self._check(targets, references)

    def _check(self, targets: list[tuple[torch.Tensor, torch.Tensor]], references: list[tuple | None]) -> None:
        """Debugging (``verify_restores``): restored rows against their blobs' decodes when they were made.
        Synchronises with the device; counts ``verified_restores`` and ``verify_failures``."""
        for (slots, _), ref in zip(targets, references, strict=True):
            if ref is None:
                continue
            k, v = self.kv.gather(slots)  # [L, T, H, D] each
            self.stats.verified_restores += 1
            diff = max(float((a.cpu().float() - b.float()).abs().max()) for a, b in zip((k, v), ref, strict=True))
            if diff > VERIFY_TOLERANCE:
                self.stats.verify_failures += 1
                logger.error("kvtc: a restored node of %d rows differs from its blob by %.3g", len(slots), diff)
