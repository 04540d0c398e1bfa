"""Every pool-row read or write of the codec is ordered after SGLang's forward stream, and every later batch
after it (the fence HiCache has; ``cache/controller.py``, rules 1 and 2), checked on the CPU with a recording
stand-in for the CUDA stream API, on the real SGLang pool, allocator and radix cache with real K/V.

The reference is the rule itself, written as a check over the recorded log: for an access of pool rows on
stream S at log position i, with f the last forward batch before i, S waited on an event recorded on the
forward stream after f; and the next forward batch after a restore or a blob put waited on an event recorded
on S after i. Background encodes (which overlap later batches on purpose) are ordered before the batch that
follows their commit, before any of their rows can be freed.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.cache.radix import KVTCRadixCache
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import BankKV, Driver, build_pool

pytestmark = pytest.mark.model


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
        pass


class FakeStream:
    def __init__(self, log: Log, name: str) -> None:
        self.log, self.name = log, name

    def wait_event(self, event: FakeEvent) -> None:
        self.log.add("wait", self, event)

    def __repr__(self) -> str:
        return f"<{self.name}>"


class RecordingOps:
    """The controller's stream API (``CudaStreamOps``), recording instead of launching."""

    def __init__(self, log: Log) -> None:
        self.log = log
        self.forward = FakeStream(log, "forward")
        self.local = threading.local()
        self.made = 0

    def stream(self, device):
        self.made += 1
        return FakeStream(self.log, ["side", "store", "load"][self.made - 1])

    def event(self) -> FakeEvent:
        return FakeEvent(self.log)

    def current(self, device):
        return getattr(self.local, "stream", self.forward)

    @contextmanager
    def use(self, stream):
        before = getattr(self.local, "stream", self.forward)
        self.local.stream = stream
        try:
            yield
        finally:
            self.local.stream = before


def _wrap(monkeypatch, obj, name: str, ops: RecordingOps, kind: str) -> None:
    fn = getattr(obj, name)

    def recorded(*args, **kwargs):
        ops.log.add("access", kind, ops.current(None))
        return fn(*args, **kwargs)

    monkeypatch.setattr(obj, name, recorded)


def check_rules(entries: list[tuple], forward: FakeStream) -> dict[str, int]:
    """The fence rules over a log; returns how many accesses of each kind were checked."""
    checked: dict[str, int] = {}
    for i, e in enumerate(entries):
        if e[0] != "access":
            continue
        kind, stream = e[1], e[2]
        assert stream is not forward, f"{kind} ran on the forward stream itself (log entry {i})"
        # an encode reads rows the tree holds since before its job was queued: it must follow every batch
        # issued before the submit (later batches run beside it on purpose); the others follow every batch
        issued = i if kind != "encode" else max(j for j in range(i) if entries[j][0] == "submit")
        last_fwd = max((j for j in range(issued) if entries[j][0] == "batch"), default=-1)
        waited = [
            j for j in range(last_fwd + 1, i)
            if entries[j][0] == "wait" and entries[j][1] is stream and entries[j][2].stream is forward
            and entries[j][2].at > last_fwd
        ]
        assert waited, f"{kind} on {stream} at {i} did not wait on the forward stream after batch {last_fwd}"
        if kind != "encode":  # rule 2 for restores and puts: the next batch waits on them
            nxt = next((j for j in range(i + 1, len(entries)) if entries[j][0] == "batch"), len(entries))
            ordered = [
                j for j in range(i + 1, nxt)
                if entries[j][0] == "wait" and entries[j][1] is forward and entries[j][2].stream is stream
                and entries[j][2].at > i
            ]
            assert ordered, f"the batch after {kind} at {i} does not wait on {stream}"
        checked[kind] = checked.get(kind, 0) + 1
    return checked


@pytest.mark.parametrize("ps", [1, 16])
def test_every_pool_access_is_fenced_against_the_forward_stream(codec, artifact, kv_bank, ps, monkeypatch):
    log = Log()
    ops = RecordingOps(log)
    _, allocator = build_pool(artifact.spec, 1024, ps)
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    params = CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator, page_size=ps)
    config = KVTCCacheConfig(
        calibration="t", window_tokens=16, idle_watermark=0.0, ready_fraction=1.0, store_fraction=0.25,
        encode="background",  # the worker and its streams (auto is inline for a CPU pool)
    )
    cache = KVTCRadixCache(params, codec, config, stream_ops=ops)
    cache.bind_forward_stream(None)  # the normal loop: the scheduler's current stream is the forward stream
    assert cache.ctl.forward_stream() is ops.forward
    _wrap(monkeypatch, cache.ctl.codec, "encode_rows_many", ops, "encode")
    submit = cache.ctl.submit

    def logged_submit(targets):
        log.add("submit")
        return submit(targets)

    monkeypatch.setattr(cache.ctl, "submit", logged_submit)
    _wrap(monkeypatch, cache.ctl.codec, "decode_rows_many", ops, "restore")
    _wrap(monkeypatch, cache.store, "put", ops, "put")
    _wrap(monkeypatch, cache.store, "get", ops, "get")
    drv = Driver(cache, BankKV(*kv_bank))
    scatter = drv.kv.scatter

    def forward_batch(slots, k, v):  # the forward writing new KV rows: one batch on the forward stream
        log.add("batch")
        scatter(slots, k, v)

    drv.kv.scatter = forward_batch
    seqs = [[i, *range(2000 + 300 * i, 2000 + 300 * i + 280)] for i in range(5)]  # more than the pool holds
    for _ in range(2):
        for seq in seqs:
            drv.finish(drv.start(seq))
            cache.ctl.wait()  # the worker's encode has run: the log is in a settled order
    check_invariants(cache)
    checked = check_rules(log.entries, ops.forward)
    assert checked.get("encode", 0) > 0 and checked.get("put", 0) > 0 and checked.get("restore", 0) > 0, checked
    # a committed encode is ordered before the batches that follow its commit (its rows may be freed then)
    encode_events = [e[1] for e in log.entries if e[0] == "record" and e[2].name == "side"]
    waited_on = {id(e[2]) for e in log.entries if e[0] == "wait" and e[1] is ops.forward}
    assert encode_events and all(id(ev) in waited_on for ev in encode_events)
    cache.ctl.shutdown()


def test_the_rule_check_fails_on_an_unfenced_access():
    """The check itself can fail: an access with no wait on the forward stream, or a batch that does not wait
    on a put before it, is caught."""
    log = Log()
    ops = RecordingOps(log)
    side = ops.stream(None)
    log.add("batch")
    log.add("access", "restore", side)
    with pytest.raises(AssertionError, match="did not wait"):
        check_rules(log.entries, ops.forward)
    log = Log()
    ops = RecordingOps(log)
    store = FakeStream(log, "store")
    log.add("batch")
    ev = ops.event()
    ev.record(ops.forward)
    store.wait_event(ev)
    log.add("access", "put", store)  # fenced (rule 1) ...
    log.add("batch")  # ... but this batch does not wait on it (rule 2)
    with pytest.raises(AssertionError, match="does not wait"):
        check_rules(log.entries, ops.forward)
