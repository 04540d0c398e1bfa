"""The asynchronous side of the L3 tier: a bounded write queue, prefetches with deadlines, counters.

One ``L3Client`` owns the threads that talk to an ``L3Backend`` (like SGLang's ``HiCacheController`` storage
threads): a writer thread draining a bounded queue, and a few reader threads running prefetches. The serving
thread only enqueues and polls: ``put_async`` drops the write when the queue is full (back-pressure drops L3
writes rather than stalling serving), ``poll`` never waits, and a prefetch whose deadline has passed is
reported finished with what was fetched so far even while its backend call still hangs (the call's thread
finishes it later and the result is discarded). Threads are daemons and ``close`` joins them for a bounded
time, so a hung backend never hangs shutdown.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from kvtc_sglang.tiers.l3 import L3Backend, check_data, check_key

logger = logging.getLogger(__name__)

_BACKEND_ERRORS = (OSError, RuntimeError, ValueError)  # what a misbehaving backend may still raise: logged, counted


@dataclass
class L3Counters:
    """Running totals (``L3Client.counters`` returns a copy). ``put_dropped``: writes refused because the queue was
    full; ``prefetch_timeouts``: prefetches reported at their deadline with their backend calls unfinished;
    ``get_misses``: looked-up keys not fetched because the store lacked them (from a lookup's first missing key on);
    ``prefetch_dropped``: lookups refused because the prefetch queue was full (reported with no objects)."""

    put_objects: int = 0
    put_bytes: int = 0
    put_dropped: int = 0
    put_failed: int = 0
    put_seconds: float = 0.0
    get_objects: int = 0
    get_bytes: int = 0
    get_misses: int = 0
    get_errors: int = 0
    get_seconds: float = 0.0
    prefetch_timeouts: int = 0
    prefetch_dropped: int = 0


@dataclass(frozen=True)
class PrefetchResult:
    """A finished prefetch: ``keys`` is the longest prefix of the looked-up keys whose objects were all fetched,
    ``objects`` their bytes (same length); ``timed_out`` when the deadline cut it short."""

    request_id: str
    keys: list[str]
    objects: list[bytes]
    timed_out: bool = False


@dataclass
class _Prefetch:
    request_id: str
    keys: list[str]
    deadline: float
    objects: list[bytes] = field(default_factory=list)
    done: bool = False
    abandoned: bool = False  # reported, cancelled or closed: the reader stops and its results are dropped


class L3Client:
    """Asynchronous puts and prefetches against ``backend``. ``write_queue_depth``: queued writes before
    ``put_async`` drops; ``timeout_s``: each prefetch's deadline; ``readers``: prefetch threads;
    ``prefetch_queue_depth``: lookups waiting for a reader. The client owns the backend (``close`` closes it)."""

    def __init__(self, backend: L3Backend, *, write_queue_depth: int = 64, timeout_s: float = 2.0, readers: int = 2,
                 prefetch_queue_depth: int = 256, close_timeout_s: float = 2.0) -> None:  # fmt: skip
        for name, value in (("write_queue_depth", write_queue_depth), ("readers", readers),
                            ("prefetch_queue_depth", prefetch_queue_depth)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
        for name, seconds in (("timeout_s", timeout_s), ("close_timeout_s", close_timeout_s)):
            if not isinstance(seconds, int | float) or not seconds > 0:
                raise ValueError(f"{name}: expected seconds > 0, got {seconds!r}")
        self.backend = backend
        self.timeout_s = float(timeout_s)
        self.close_timeout_s = float(close_timeout_s)
        self._lock = threading.Lock()
        self._counters = L3Counters()
        self._writes: queue.Queue[tuple[str, bytes | Callable[[], bytes]]] = queue.Queue(maxsize=write_queue_depth)
        self._lookups: queue.Queue[_Prefetch] = queue.Queue(maxsize=prefetch_queue_depth)
        self._prefetches: dict[str, _Prefetch] = {}
        self._stop = threading.Event()
        self._writing = 0  # 1 while the writer is inside backend.put
        self._threads = [threading.Thread(target=self._write_loop, name="l3-writer", daemon=True)]
        self._threads += [threading.Thread(target=self._read_loop, name=f"l3-reader-{i}", daemon=True)
                          for i in range(readers)]  # fmt: skip
        for t in self._threads:
            t.start()

    @property
    def counters(self) -> L3Counters:
        with self._lock:
            return replace(self._counters)

    def _add(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self._counters, name, getattr(self._counters, name) + amount)

    # ---- writes

    def put_async(self, key: str, data: bytes | Callable[[], bytes]) -> bool:
        """Queues a write; ``False`` (dropped, counted) when the queue is full or the client is closed. ``data``
        may be a function the writer thread calls for the bytes (work the caller's thread must not wait for,
        e.g. a device-to-host copy to synchronize with); its ``RuntimeError``/``ValueError`` fails the put."""
        item = (check_key(key), data if callable(data) else check_data(data))
        if self._stop.is_set():
            self._add(put_dropped=1)
            return False
        try:
            self._writes.put_nowait(item)
        except queue.Full:
            self._add(put_dropped=1)
            return False
        return True

    @property
    def pending_writes(self) -> int:
        return self._writes.qsize() + self._writing

    def flush(self, timeout_s: float) -> bool:
        """Waits up to ``timeout_s`` for the queued writes to finish (tests, shutdown); whether they did."""
        end = time.monotonic() + timeout_s
        while self.pending_writes:
            if time.monotonic() >= end:
                return False
            time.sleep(0.005)
        return True

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            try:
                key, data = self._writes.get(timeout=0.05)
            except queue.Empty:
                continue
            self._writing = 1
            t0 = time.perf_counter()
            try:
                if callable(data):
                    data = check_data(data())
                ok = self.backend.put(key, data)
            except _BACKEND_ERRORS as e:
                logger.warning("L3 put of %s raised %s: %s", key, type(e).__name__, e)
                ok = False
                data = b""
            seconds = time.perf_counter() - t0
            if ok:
                self._add(put_objects=1, put_bytes=len(data), put_seconds=seconds)
            else:
                self._add(put_failed=1, put_seconds=seconds)
            self._writing = 0

    # ---- prefetches

    def lookup(self, request_id: str, keys: list[str]) -> None:
        """Starts fetching the longest stored prefix of ``keys`` for ``request_id`` (reported by ``poll``)."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id: expected a non-empty str, got {request_id!r}")
        keys = [check_key(k) for k in keys]
        p = _Prefetch(request_id, keys, time.monotonic() + self.timeout_s)
        with self._lock:
            if request_id in self._prefetches:
                raise ValueError(f"request_id: {request_id!r} already has a prefetch in flight (poll or cancel it)")
            self._prefetches[request_id] = p
        if not keys or self._stop.is_set():
            p.done = True
            return
        try:
            self._lookups.put_nowait(p)
        except queue.Full:
            self._add(prefetch_dropped=1)
            p.done = True

    def cancel(self, request_id: str) -> bool:
        """Forgets a prefetch (its results are dropped); whether one was in flight."""
        with self._lock:
            p = self._prefetches.pop(request_id, None)
            if p is not None:
                p.abandoned = True
        return p is not None

    def poll(self) -> list[PrefetchResult]:
        """The prefetches finished or past their deadline, never blocking."""
        now = time.monotonic()
        out = []
        with self._lock:
            for rid, p in list(self._prefetches.items()):
                if not p.done and now < p.deadline:
                    continue
                del self._prefetches[rid]
                p.abandoned = True
                if not p.done:
                    self._counters.prefetch_timeouts += 1
                out.append(PrefetchResult(rid, p.keys[: len(p.objects)], list(p.objects), timed_out=not p.done))
        return out

    def _read_loop(self) -> None:
        while not self._stop.is_set():
            try:
                p = self._lookups.get(timeout=0.05)
            except queue.Empty:
                continue
            self._prefetch(p)
            p.done = True

    def _live(self, p: _Prefetch) -> bool:
        return not p.abandoned and not self._stop.is_set() and time.monotonic() < p.deadline

    def _prefetch(self, p: _Prefetch) -> None:
        if not self._live(p):
            return
        t0 = time.perf_counter()
        try:
            hits = self.backend.exists(p.keys)
        except _BACKEND_ERRORS as e:
            logger.warning("L3 exists for %s raised %s: %s", p.request_id, type(e).__name__, e)
            self._add(get_errors=1, get_seconds=time.perf_counter() - t0)
            return
        stored = next((i for i, hit in enumerate(hits) if not hit), len(hits))
        self._add(get_misses=len(p.keys) - stored)
        for i, key in enumerate(p.keys[:stored]):
            if not self._live(p):
                break
            try:
                data = self.backend.get(key)
            except _BACKEND_ERRORS as e:
                logger.warning("L3 get of %s raised %s: %s", key, type(e).__name__, e)
                self._add(get_errors=1)
                break
            if data is None:  # listed by exists, gone by now (evicted) or failed
                self._add(get_misses=stored - i)
                break
            self._add(get_objects=1, get_bytes=len(data))
            with self._lock:
                if p.abandoned:
                    break
                p.objects.append(data)
        self._add(get_seconds=time.perf_counter() - t0)

    # ---- shutdown

    def close(self) -> None:
        """Stops the threads (bounded join; a thread stuck in a backend call is left behind, it is a daemon),
        drops queued writes and pending prefetches, and closes the backend."""
        if self._stop.is_set():
            return
        self._stop.set()
        end = time.monotonic() + self.close_timeout_s
        for t in self._threads:
            t.join(max(0.0, end - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            logger.warning("L3 client closed with threads stuck in backend calls: %s", stuck)
        with self._lock:
            for p in self._prefetches.values():
                p.abandoned = True
        self.backend.close()


__all__ = ["L3Client", "L3Counters", "PrefetchResult"]
