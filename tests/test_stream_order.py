"""Every pool-row access kvtc makes outside the forward follows the stream rules of
``kvtc_sglang/cache/streams.py``, checked on the CPU with a recording stand-in for the CUDA stream API
(``tests/stream_recorder.py``), on the real SGLang pool, allocator and radix cache with real K/V, under SGLang's
overlap scheduler (a schedule stream distinct from the forward stream) and the normal loop.

The reference is the rules themselves, written as checks over the recorded log (``check_rules``): row accesses
wait on the forward stream's fence and on the schedule stream after what it produced; blob reads wait on their
put and never on the forward in flight; the next batch or slot free waits on puts, restores and inline encodes;
an inline encode never runs on the worker's stream; no host sync on a stream that waited on the forward.
"""

from __future__ import annotations

import threading

import pytest
from triton.runtime import interpreter

pytest.importorskip("sglang")  # the cache imports SGLang; the GPU image lacks it unless it travels

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.cache.radix import KVTCRadixCache
from kvtc_sglang.codec import KVTCCodec
from kvtc_sglang.triton_kernels.common import LayerTable
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import BankKV, Driver, build_pool
from tests.stream_recorder import FakeStream, Log, RecordingOps, SyncCounter, check_rules

pytestmark = pytest.mark.model


def _thread() -> str:
    return "worker" if threading.current_thread().name.startswith("kvtc-encode") else "scheduler"


def _run(codec, artifact, kv_bank, monkeypatch, *, ps: int, mode: str, overlap: bool, fail_restore: bool = False,
         counter_streams: tuple[str, ...] = (), again: int = 5):  # fmt: skip
    """A workload larger than the pool through the real cache (five sequences, then the first ``again`` of them
    once more), every access logged; returns (log, ops, cache)."""
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    log = Log()
    ops = RecordingOps(log, overlap)
    _, allocator = build_pool(artifact.spec, 1024, ps)
    params = CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator, page_size=ps)
    config = KVTCCacheConfig(
        calibration="t", window_tokens=16, idle_watermark=0.0, ready_fraction=1.0, store_fraction=0.25, encode=mode,
    )
    cache = KVTCRadixCache(params, codec, config, stream_ops=ops)
    cache.bind_forward_stream(ops.forward if overlap else None)  # as the plugin does
    ctl, store = cache.ctl, cache.store

    def access(obj, name: str, kind: str, ready=None) -> None:
        fn = getattr(obj, name)

        def recorded(*args, **kwargs):
            got = ready(*args) if ready else None
            log.add("access", kind, ops.current(), _thread(), got)
            return fn(*args, **kwargs)

        monkeypatch.setattr(obj, name, recorded)

    def produce(obj, name: str, free: bool) -> None:
        fn = getattr(obj, name)

        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            log.add("produce", ops.current())
            if free:
                log.add("free")
            return out

        monkeypatch.setattr(obj, name, recorded)

    access(ctl.codec, "encode_rows_many", "encode")
    access(ctl.codec.payload_backend(ctl.kv.device), "decode_rows", "restore")
    if hasattr(store, "reserve"):
        access(store, "reserve", "reserve")
    access(store, "write" if hasattr(store, "write") else "put", "put")  # (a store without reserve: one call)
    access(store, "get", "read", ready=lambda handle: getattr(handle, "ready", None))
    produce(allocator, "alloc", free=False)
    produce(allocator, "free", free=True)
    produce(allocator, "free_segment", free=True)
    produce(cache, "_split_node", free=False)
    submit = ctl.submit
    monkeypatch.setattr(ctl, "submit", lambda targets, plans=None: (log.add("submit"), submit(targets, plans))[1])
    if fail_restore:  # the first restore writes its first blob's rows, then fails
        name = "write_rows_many" if hasattr(ctl.codec, "write_rows_many") else "decode_rows_many"  # (one call)
        write = getattr(ctl.codec, name)
        failed = []

        def failing(*args, **kwargs):
            if failed:
                return write(*args, **kwargs)
            failed.append(True)
            if name == "write_rows_many":  # (payloads, headers, k_layers, v_layers, targets)
                payloads, headers, k, v, targets = args
                write(payloads[:1], headers[:1], k, v, targets[:1])
            else:  # (blobs, k_layers, v_layers, targets, headers=)
                blobs, k, v, targets = args
                write(blobs[:1], k, v, targets[:1], headers=kwargs["headers"][:1])
            raise RuntimeError("injected after the first blob")

        monkeypatch.setattr(ctl.codec, name, failing)
    drv = Driver(cache, BankKV(*kv_bank))
    scatter = drv.kv.scatter

    def forward_batch(slots, k, v):  # the forward writing new KV rows: one batch on the forward stream
        log.add("batch")
        scatter(slots, k, v)

    drv.kv.scatter = forward_batch
    counter = SyncCounter(log, ops, counter_streams)
    if counter_streams:  # Triton's interpreter stands in for a kernel launch; the host bound check is the CPU's
        for cls, name in ((interpreter.InterpretedFunction, "run"), (LayerTable, "check_slots")):
            fn = getattr(cls, name)
            monkeypatch.setattr(cls, name, lambda *a, _fn=fn, **k: _quiet(counter, _fn, a, k))
    seqs = [[i, *range(2000 + 300 * i, 2000 + 300 * i + 280)] for i in range(5)]  # more than the pool holds
    with counter if counter_streams else _nothing():
        for seq in seqs + seqs[:again]:  # the second time round: restores
            drv.finish(drv.start(seq))
            ctl.wait()  # the worker's encode has run: the log is in a settled order
    check_invariants(cache)
    ctl.shutdown()
    return log, ops, cache


def _quiet(counter: SyncCounter, fn, args, kwargs):
    with counter.not_counting():
        return fn(*args, **kwargs)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize(
    "case", [(1, "background", True), (16, "background", True), (16, "inline", True), (1, "inline", False)],
    ids=["ps1-background-overlap", "ps16-background-overlap", "ps16-inline-overlap", "ps1-inline-normal"],
)
def test_every_pool_access_follows_the_stream_rules(codec, artifact, kv_bank, case, monkeypatch):
    ps, mode, overlap = case  # page size, where encodes run, SGLang's overlap scheduler (a distinct schedule stream)
    log, ops, cache = _run(codec, artifact, kv_bank, monkeypatch, ps=ps, mode=mode, overlap=overlap)
    checked = check_rules(log.entries, ops)
    for kind in ("encode", "reserve", "put", "read", "restore"):
        assert checked.get(kind, 0) > 0, checked
    threads = {e[3] for e in log.entries if e[0] == "access" and e[1] == "encode"}
    assert threads == ({"worker"} if mode == "background" else {"scheduler"}), threads
    # every encode's event is waited on by the forward before its rows can be freed
    encode_events = [e[1] for e in log.entries if e[0] == "record" and e[2].name in ("encode", "inline")]
    waited_on = {id(e[2]) for e in log.entries if e[0] == "wait" and e[1] is ops.forward}
    assert encode_events and all(id(ev) in waited_on for ev in encode_events)
    assert not [e for e in log.entries if e[0] == "sync"], "the scheduler thread waited on a stream or event"


def test_a_failed_restore_is_fenced_before_its_slots_are_freed(codec, artifact, kv_bank, monkeypatch):
    log, ops, cache = _run(codec, artifact, kv_bank, monkeypatch, ps=16, mode="background", overlap=False,
                           fail_restore=True)  # fmt: skip
    assert cache.stats.restore_failures == 1
    first = next(i for i, e in enumerate(log.entries) if e[0] == "access" and e[1] == "restore")
    assert any(e[0] == "free" for e in log.entries[first:]), "the failed restore's slots were not freed"
    assert check_rules(log.entries, ops, kinds=("restore",)).get("restore", 0) > 0  # this rule alone
    assert check_rules(log.entries, ops)  # and every other


def test_no_host_sync_after_the_forward_fence(artifact, kv_bank, monkeypatch):
    """Puts and a restore's row writes (the Triton path, as on a GPU) make no host sync: their streams have
    waited on the forward in flight, so any sync there would make the scheduler thread wait for it."""
    codec = KVTCCodec(artifact, kernels="triton")
    # encodes (the worker's, where host syncs are allowed) through the torch path: the same blobs, and the
    # interpreter's time goes to the restores this test is about
    monkeypatch.setattr(codec, "encode_rows_many", KVTCCodec(artifact, kernels="torch").encode_rows_many)
    log, ops, _ = _run(codec, artifact, kv_bank, monkeypatch, ps=16, mode="inline", overlap=True,
                       counter_streams=("store", "load"), again=1)  # fmt: skip
    checked = check_rules(log.entries, ops)
    assert checked.get("put", 0) > 0 and checked.get("restore", 0) > 0, checked
    syncs = [(e[1], e[2].name) for e in log.entries if e[0] == "sync"]
    assert syncs == [], f"host syncs on fenced streams: {syncs[:10]} ({len(syncs)})"


def test_the_rule_check_fails_on_unfenced_accesses():
    """The checks can fail: an access with no wait on the forward stream, a batch that does not wait on a put
    before it, a blob read that waits on the forward in flight."""
    log = Log()
    ops = RecordingOps(log, overlap=False)
    load = ops.stream(None)
    log.add("batch")
    log.add("access", "restore", load, "scheduler", None)
    with pytest.raises(AssertionError, match="did not wait on the forward"):
        check_rules(log.entries, ops)
    log = Log()
    ops = RecordingOps(log, overlap=False)
    store = FakeStream(log, "store")
    log.add("batch")
    ev = ops.event()
    ev.record(ops.forward)
    store.wait_event(ev)
    log.add("access", "put", store, "scheduler", None)  # fenced (rule 1) ...
    log.add("batch")  # ... but this batch does not wait on it (rule 3)
    with pytest.raises(AssertionError, match="is not ordered after"):
        check_rules(log.entries, ops)
    log = Log()
    ops = RecordingOps(log, overlap=True)
    read = FakeStream(log, "read")
    put_done = ops.event()
    put_done.record(store)
    log.add("batch")
    fence = ops.event()
    fence.record(ops.forward)
    read.wait_event(put_done)
    read.wait_event(fence)  # the read now waits on the forward in flight
    log.add("access", "read", read, "scheduler", put_done)
    with pytest.raises(AssertionError, match="waited on the forward"):
        check_rules(log.entries, ops)
