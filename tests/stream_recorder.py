"""A recording stand-in for the CUDA stream API (``kvtc_sglang.cache.streams.CudaStreamOps``) and the fence
rules written as checks over its log, for ``test_stream_order.py``.

The log is one list of entries in program order (both threads append under a lock):

- ``("batch",)``: a forward batch issued on the forward stream;
- ``("produce", stream)``: the scheduler made tensors on ``stream`` (the allocator's alloc/free, split copies);
- ``("free",)``: the tree gave pool slots back to the allocator;
- ``("submit",)``: a background encode was queued (its rows are read later, by the worker);
- ``("access", kind, stream, thread, ready)``: kvtc touched pool rows or blobs on ``stream``; kinds:
  ``encode``, ``reserve`` (the store's free-list and page-table work), ``put`` (blob rows written), ``read``
  (a blob read back, ``ready``: its put's event), ``restore`` (pool rows written by a restore);
- ``("record", event, stream)``, ``("wait", stream, event)``;
- ``("sync", what, stream)``: a host synchronisation while a kvtc stream was current (``SyncCounter``).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch
from torch.overrides import TorchFunctionMode

ROW_KINDS = ("encode", "put", "restore")  # write or read pool rows: after the forward's fence
ORDERED_BEFORE_NEXT_BATCH = ("put", "restore")  # the next batch waits on them


class Log:
    def __init__(self) -> None:
        self.entries: list[tuple] = []
        self.lock = threading.Lock()

    def add(self, *entry) -> int:
        with self.lock:
            self.entries.append(entry)
            return len(self.entries) - 1


class FakeEvent:
    def __init__(self, log: Log) -> None:
        self.log, self.stream, self.at = log, None, None

    def record(self, stream) -> None:
        self.stream = stream
        self.at = self.log.add("record", self, stream)

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        self.log.add("sync", "event.synchronize", self.stream)


class FakeStream:
    def __init__(self, log: Log, name: str) -> None:
        self.log, self.name = log, name

    def wait_event(self, event: FakeEvent) -> None:
        self.log.add("wait", self, event)

    def __repr__(self) -> str:
        return f"<{self.name}>"


class RecordingOps:
    """The stream API, recording instead of launching. ``overlap``: the scheduler thread's current stream is a
    schedule stream distinct from the forward stream (SGLang's overlap scheduler); else it is the forward."""

    def __init__(self, log: Log, overlap: bool) -> None:
        self.log = log
        self.forward = FakeStream(log, "forward")
        self.schedule = FakeStream(log, "schedule") if overlap else self.forward
        self.local = threading.local()
        self.kvtc: dict[str, FakeStream] = {}

    def stream(self, device):
        names = ("encode", "inline", "store", "read", "load", "host")
        s = FakeStream(self.log, names[len(self.kvtc)])
        self.kvtc[s.name] = s
        return s

    def event(self) -> FakeEvent:
        return FakeEvent(self.log)

    def current(self, device=None):
        return getattr(self.local, "stream", self.schedule)

    @contextmanager
    def use(self, stream):
        before = self.current()
        self.local.stream = stream
        try:
            yield
        finally:
            self.local.stream = before

    def synchronize(self, device) -> None:
        self.log.add("sync", "device.synchronize", self.current())


def _waited(entries: list[tuple], stream, on, after: int, before: int) -> bool:
    """``stream`` waited, between log positions ``after`` and ``before``, on an event recorded on ``on`` after
    ``after``."""
    return any(
        e[0] == "wait" and e[1] is stream and e[2].stream is on and e[2].at > after
        for e in entries[after + 1 : before]
    )


def _issue_point(entries: list[tuple], i: int) -> int:
    """Where the work of access ``i`` was issued: a background encode at its submit, anything else at ``i``."""
    kind, stream = entries[i][1], entries[i][2]
    if kind == "encode" and stream.name == "encode":
        return max(j for j in range(i) if entries[j][0] == "submit")
    return i


def check_rules(entries: list[tuple], ops: RecordingOps, kinds: tuple[str, ...] | None = None) -> dict[str, int]:
    """The fence rules (``kvtc_sglang/cache/streams.py``) over a log, for the accesses of ``kinds`` (all: ``None``);
    returns the accesses checked per kind."""
    forward, schedule = ops.forward, ops.schedule
    checked: dict[str, int] = {}
    for i, e in enumerate(entries):
        if e[0] != "access" or (kinds is not None and e[1] not in kinds):
            continue
        kind, stream, thread, ready = e[1], e[2], e[3], e[4]
        assert stream is not forward and stream is not schedule, f"{kind} ran on SGLang's stream {stream} ({i})"
        issued = _issue_point(entries, i)
        last_batch = max((j for j in range(issued) if entries[j][0] == "batch"), default=-1)
        if kind in ROW_KINDS:  # rule 1: after the forward's fence
            assert _waited(entries, stream, forward, last_batch, i), (
                f"{kind} on {stream} at {i} did not wait on the forward stream after batch {last_batch}"
            )
        if kind in (*ROW_KINDS, "reserve"):  # rule 1: after what the scheduler made (the forward: normal loop)
            produced = max((j for j in range(issued) if entries[j][0] == "produce" and entries[j][1] is schedule),
                           default=-1)  # fmt: skip
            assert produced < 0 or _waited(entries, stream, schedule, produced, i), (
                f"{kind} on {stream} at {i} did not wait on the schedule stream after its production at {produced}"
            )
        if kind == "read":  # rule 2: after the blob's put, never after the forward in flight
            assert ready is not None and any(
                x[0] == "wait" and x[1] is stream and x[2] is ready for x in entries[:i]
            ), f"a blob read at {i} did not wait on its put's event"
            assert not _waited(entries, stream, forward, last_batch, i), f"a blob read at {i} waited on the forward"
        if kind == "encode" and thread == "scheduler":
            assert stream.name != "encode", f"an inline encode at {i} ran on the worker's stream"
        if kind in ORDERED_BEFORE_NEXT_BATCH or (kind == "encode" and thread == "scheduler"):  # rule 3
            nxt = next((j for j in range(i + 1, len(entries)) if entries[j][0] in ("batch", "free")), len(entries))
            assert _waited(entries, forward, stream, i, nxt), (
                f"the {entries[nxt][0] if nxt < len(entries) else 'next batch'} at {nxt} after the {kind} at {i} "
                f"is not ordered after {stream}"
            )
        checked[kind] = checked.get(kind, 0) + 1
    return checked


SYNC_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "synchronize"}


class SyncCounter(TorchFunctionMode):
    """Counts host synchronisations (``.item()``, ``.tolist()``, ``.cpu()``, ``int(t)``, ..., blocking copies:
    ``.to(device)`` without ``non_blocking``, ``torch.tensor(..., device=...)``) made while one of ``streams``
    is current; Triton's interpreter (which stands in for a kernel launch) is not counted."""

    def __init__(self, log: Log, ops: RecordingOps, streams: tuple[str, ...]) -> None:
        super().__init__()
        self.log, self.ops, self.streams = log, ops, streams
        self.paused = threading.local()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        stream = self.ops.current()
        if not getattr(self.paused, "on", False) and getattr(stream, "name", None) in self.streams:
            blocking_copy = name in ("to", "copy_") and not kwargs.get("non_blocking", False) and (
                "device" in kwargs or any(isinstance(a, (str, torch.device)) for a in args[1:])
            )
            if name in SYNC_METHODS or blocking_copy or (name == "tensor" and "device" in kwargs):
                self.log.add("sync", name, stream)
        return func(*args, **kwargs)

    @contextmanager
    def not_counting(self):
        self.paused.on = True
        try:
            yield
        finally:
            self.paused.on = False
