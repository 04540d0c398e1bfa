"""The L3 tier in the tree (``cache/l3_tier.py``) on the real SGLang pool, allocator and RadixCache (CPU) with
real SmolLM2 K/V and the directory backend: one cache writes whole-chunk blobs at its commits, a second cache
(another replica, or the same server after a restart: an empty tree, its own pool) parks a request, prefetches
its chunks and restores them through the one-call restore.

Reference first: the second cache without the objects (an empty directory) matches nothing and the request
prefills; every damaged or foreign object is a miss.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import rel_err
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.cache.factory import build_l3
from kvtc_sglang.cache.l3_writes import L3Writer
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import Driver, build_cache, build_pool

FUTURE = 1e9
CHUNK = 64
SEQ = [9000] + list(range(299))  # 300 tokens: chunks [4, 64), [64, 128), [128, 192), [192, 256) are whole


@dataclass
class Req:
    """The fields of SGLang's ``Req`` the L3 tier reads (a waiting request before its first prefill)."""

    rid: str
    origin_input_ids: list[int]
    extra_key: str | None = None
    cache_salt: str | None = None
    is_retracted: bool = False
    output_ids: list[int] = field(default_factory=list)


def make(codec, artifact, directory: Path, model: str = "smollm2", **cfg):
    _, allocator = build_pool(artifact.spec, 2048, 1)
    config = KVTCCacheConfig(calibration="unused-in-tests", l3="directory", host_bytes=64 << 20, **{
        "encode": "inline", "window_tokens": 8,
        "l3_config": f'{{"path": "{directory}", "chunk_tokens": {CHUNK}, "prefetch_timeout_s": 5}}', **cfg,
    })  # fmt: skip
    cache = build_cache(allocator, 1, codec, config)
    cache.l3 = build_l3(cache, config, artifact.spec, model, tp_size=1, tp_rank=0)
    return cache


def write_session(codec, artifact, bank, directory: Path):
    cache = make(codec, artifact, directory)
    drv = Driver(cache, bank)
    drv.finish(drv.start(SEQ))
    cache.compress_idle(now=FUTURE)
    assert cache.l3.client.flush(10.0)
    cache.scheduler_tick([])  # the client's counters are mirrored at ticks
    return cache


def prefetch(cache, req: Req) -> list:
    """Ticks until the parked request is back in the waiting queue; returns the queue."""
    waiting = [req]
    cache.scheduler_tick(waiting)
    end = time.monotonic() + 10
    while not waiting and time.monotonic() < end:
        time.sleep(0.01)
        cache.scheduler_tick(waiting)
    return waiting


def test_another_cache_restores_a_session_from_l3_without_prefill(codec, artifact, bank, codec_err, tmp_path):
    # reference: nothing stored, nothing matched
    empty = make(codec, artifact, tmp_path / "empty")
    assert prefetch(empty, Req("r0", [*SEQ, 5]))
    assert Driver(empty, bank).read_prefix(SEQ)[0] == 0 and empty.stats.l3_hits == 0

    writer = write_session(codec, artifact, bank, tmp_path / "l3")
    assert writer.stats.l3_put_objects == 4 and writer.stats.l3_put_dropped == 0
    reader = make(codec, artifact, tmp_path / "l3")
    waiting = prefetch(reader, Req("r1", [*SEQ, 5]))
    assert len(waiting) == 1 and reader.stats.l3_parked == 1
    assert reader.stats.l3_hits == 5 and reader.stats.l3_hit_tokens == 4 * CHUNK  # the sinks' node raw, 4 blobs
    check_invariants(reader)
    drv = Driver(reader, bank)
    n, k, v = drv.read_prefix(SEQ)
    assert n == 4 * CHUNK and reader.stats.restores == 4 and reader.stats.host_restored_tokens == 4 * CHUNK - 4
    assert torch.equal(k[:, :4], bank.k[:, :4]) and torch.equal(v[:, :4], bank.v[:, :4])  # sinks: raw, exact
    assert rel_err(k, bank.k[:, :n]) <= 1.2 * codec_err and rel_err(v, bank.v[:, :n]) <= 1.2 * codec_err
    check_invariants(reader)


def test_a_request_already_matched_is_not_parked(codec, artifact, bank, tmp_path):
    writer = write_session(codec, artifact, bank, tmp_path / "l3")
    writer.l3.client.lookup("probe", [])  # nothing in flight for the real request
    waiting = [Req("r2", [*SEQ, 5])]
    writer.scheduler_tick(waiting)
    assert waiting and writer.stats.l3_parked == 0  # its chunks are in the tree (compressed): no lookup


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign_model", "secret"])
def test_a_damaged_or_foreign_object_is_a_miss(codec, artifact, bank, tmp_path, damage):
    directory = tmp_path / "l3"
    write_session(codec, artifact, bank, directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    assert len(files) == 4
    first = min(files, key=lambda p: p.stat().st_mtime_ns)  # chunk 1 ([64, 128)) is written ... in order
    if damage == "flip":
        data = bytearray(first.read_bytes())
        data[len(data) // 2] ^= 0x01
        first.write_bytes(bytes(data))
    elif damage == "truncate":
        first.write_bytes(first.read_bytes()[:-100])
    reader_model = "another-model" if damage == "foreign_model" else "smollm2"
    with pytest.MonkeyPatch.context() as mp:
        if damage == "secret":
            mp.setenv("KVTC_L3_SECRET", "s3cret")  # the reader wants MACs the writer never made
        reader = make(codec, artifact, directory, model=reader_model)
    assert prefetch(reader, Req("r3", [*SEQ, 5]))
    n = Driver(reader, bank).read_prefix(SEQ)[0]
    if damage == "foreign_model":
        assert n == 0 and reader.stats.l3_hits == 0  # other keys: nothing found
    else:
        assert reader.stats.l3_rejected >= 1 and n < 4 * CHUNK  # the damaged chunk and those after it prefill
    check_invariants(reader)


def test_l3_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="needs a host tier"):
        KVTCCacheConfig(calibration="x", l3="directory", l3_config=f'{{"path": "{tmp_path}"}}')
    with pytest.raises(ValueError, match="l3 must be one of"):
        KVTCCacheConfig(calibration="x", l3="s3", host_bytes=1)
    with pytest.raises(ValueError, match="JSON object"):
        KVTCCacheConfig(calibration="x", l3="directory", host_bytes=1, l3_config="[1]")


def test_a_chunk_across_a_shared_head_is_written_and_restored(codec, artifact, bank, codec_err, tmp_path):
    """Chat sessions share a template head shorter than anything the encoder takes: chunk 0 of each session is
    that head's rows raw plus the session's blob, and another cache restores it."""
    head = [9000 + i for i in range(10)]
    seqs = [head + [20000 + 1000 * s + i for i in range(290)] for s in range(2)]
    writer = make(codec, artifact, tmp_path / "l3")
    drv = Driver(writer, bank)
    for seq in seqs:
        drv.finish(drv.start(seq))
    writer.compress_idle(now=FUTURE)
    assert writer.l3.client.flush(10.0)
    writer.scheduler_tick([])
    assert writer.stats.l3_put_objects == 8  # 4 whole chunks per session
    reader = make(codec, artifact, tmp_path / "l3")
    assert prefetch(reader, Req("r", [*seqs[1], 5]))
    assert reader.stats.l3_hit_tokens == 4 * CHUNK
    n, k, v = Driver(reader, bank).read_prefix(seqs[1])
    assert n == 4 * CHUNK and torch.equal(k[:, :10], bank.k[:, :10])  # the head: raw, exact
    assert rel_err(k, bank.k[:, :n]) <= 1.2 * codec_err and rel_err(v, bank.v[:, :n]) <= 1.2 * codec_err
    check_invariants(reader)


def test_write_back_writes_a_chunk_only_when_its_blobs_leave_the_server(codec, artifact, bank, codec_err, tmp_path):
    """``write_policy: write_back``: committed blobs are not written; when the session's nodes are dropped (the
    pool evicts its sinks' node, the compressed nodes under it go too) every whole chunk is written first, and
    another cache restores them. Reference: the same drop under write-through writes nothing more."""
    directory = tmp_path / "l3"
    cfg = f'{{"path": "{directory}", "chunk_tokens": {CHUNK}, "prefetch_timeout_s": 5, "write_policy": "write_back"}}'
    writer = make(codec, artifact, directory, l3_config=cfg)
    drv = Driver(writer, bank)
    drv.finish(drv.start(SEQ))
    writer.compress_idle(now=FUTURE)
    assert writer.l3.client.flush(10.0)
    writer.scheduler_tick([])
    assert writer.stats.compressions >= 4 and writer.stats.l3_put_objects == 0  # resident: nothing written
    writer.evict(EvictParams(num_tokens=4096))
    assert writer.l3.client.flush(10.0)
    writer.scheduler_tick([])
    assert writer.stats.dropped_tokens >= 4 * CHUNK - 4 and writer.stats.l3_put_objects == 4
    check_invariants(writer)
    reader = make(codec, artifact, directory)
    assert prefetch(reader, Req("r", [*SEQ, 5])) and reader.stats.l3_hit_tokens == 4 * CHUNK
    n, k, v = Driver(reader, bank).read_prefix(SEQ)
    assert n == 4 * CHUNK and torch.equal(k[:, :4], bank.k[:, :4])
    assert rel_err(k, bank.k[:, :n]) <= 1.2 * codec_err and rel_err(v, bank.v[:, :n]) <= 1.2 * codec_err

    through = write_session(codec, artifact, bank, tmp_path / "through")
    through.evict(EvictParams(num_tokens=4096))
    assert through.l3.client.flush(10.0)
    through.scheduler_tick([])
    assert through.stats.l3_put_objects == 4  # written at commit, not again at the drop


def test_a_write_policy_is_checked():
    from kvtc_sglang.cache.l3_tier import split_options

    with pytest.raises(ValueError, match="write_policy must be one of"):
        split_options({"write_policy": "write_around"})
    assert split_options({"write_policy": "write_back", "path": "/x"})[0].write_policy == "write_back"


def test_a_blob_copied_out_for_l3_is_fenced_against_the_reuse_of_its_rows(artifact):
    """On a GPU an L3 write copies a blob out of the store on kvtc's host stream after its put; under write-back
    the blob's node is dropped (its rows freed) right after, so the streams that write rows (store, load) and
    the next batch must wait on the copy."""
    from dataclasses import replace
    from types import SimpleNamespace

    from stream_recorder import Log, RecordingOps

    from kvtc_sglang.cache.placement import BlobPlacement
    from kvtc_sglang.cache.stats import KVTCStats
    from kvtc_sglang.cache.store import BlobStore
    from kvtc_sglang.cache.streams import StreamFences

    pool, allocator = build_pool(artifact.spec, 256, 1)
    log = Log()
    ops = RecordingOps(log, overlap=True)
    fences = StreamFences(torch.device("cpu"), ops)
    fences.bind_forward_stream(ops.forward)
    store = BlobStore([*pool.k_buffer, *pool.v_buffer], allocator, 1, 64)
    placement = BlobPlacement(store, fences, KVTCStats(), host_bytes=0)
    with fences.enter("store", fences.issued()):
        handle = store.put(torch.arange(3000, dtype=torch.int32).to(torch.uint8))
    handle = replace(handle, ready=fences.done("store"))
    tier = object.__new__(L3Writer)  # only the copy-out path: the cache's placement and fences
    tier.cache = SimpleNamespace(placement=placement, ctl=SimpleNamespace(fences=fences), store=store)
    (data,), copy_done = tier._blob_to_host(handle)
    assert torch.equal(data, store.get(handle))
    waits = [e for e in log.entries if e[0] == "wait"]
    host = ops.kvtc["host"]
    assert copy_done is not None and copy_done.stream is host
    assert any(e[1] is host and e[2] is handle.ready for e in waits), "the copy did not wait on the blob's put"
    for s in (ops.kvtc["store"], ops.kvtc["load"], ops.forward):
        assert any(e[1] is s and e[2] is copy_done for e in waits), f"{s} does not wait on the copy"


def test_an_abort_returns_a_parked_request_to_sglangs_queue(codec, artifact, bank, tmp_path):
    """SGLang's ``abort_request`` only looks in its queues: the plugin's hook puts a request the L3 tier holds
    back for its prefetch into the waiting queue first (where SGLang's abort answers it), its prefetch
    forgotten. Reference: without the hook the request stays parked and is grafted and released later."""
    from types import SimpleNamespace

    from sglang.srt.managers.io_struct import AbortReq
    from sglang.srt.plugins.hook_registry import HookRegistry

    from kvtc_sglang.launch.plugin import TARGET_ABORT, before_abort_request, register

    write_session(codec, artifact, bank, tmp_path / "l3")
    for abort in (None, AbortReq(rid="chat-1"), AbortReq(abort_all=True)):
        reader = make(codec, artifact, tmp_path / "l3")
        scheduler = SimpleNamespace(tree_cache=reader, waiting_queue=[Req("chat-1-a", [*SEQ, 5])])
        reader.scheduler_tick(scheduler.waiting_queue)
        assert scheduler.waiting_queue == [] and reader.stats.l3_parked == 1
        if abort is not None:
            before_abort_request(scheduler, abort)
            assert [r.rid for r in scheduler.waiting_queue] == ["chat-1-a"]  # for SGLang's abort to find
        time.sleep(0.3)
        for _ in range(3):
            reader.scheduler_tick(scheduler.waiting_queue)
        assert reader.stats.l3_hits == (5 if abort is None else 0) and reader.stats.l3_parked == 1
    before_abort_request(scheduler, AbortReq(rid="other"))  # nothing parked: nothing moves
    register()
    assert any(h is before_abort_request for _t, h, _s in HookRegistry._hooks.get(TARGET_ABORT, []))


def test_a_chunk_offered_again_is_not_written_again(codec, artifact, bank, tmp_path):
    """A chunk whose object this server queued (or fetched) is not built and written again when it is offered
    again (re-encoded after its kept blob was dropped, or dropped under write-back after a graft). Reference: a
    writer that forgot its keys queues every chunk again."""
    from kvtc_sglang.cache.l3_objects import path_of

    writer = write_session(codec, artifact, bank, tmp_path / "l3")
    assert writer.stats.l3_put_objects == 4
    nodes = list(writer.io.entries)

    def offer_all() -> int:
        return sum(writer.l3.writer.offer(n, path_of(n)[-1][1]) for n in nodes)

    assert offer_all() == 0
    writer.l3.writer._stored.clear()
    assert offer_all() == 4
