"""KVTCRadixCache on the real SGLang pool, allocators and RadixCache (CPU), with real SmolLM2 K/V.

Reference first: a vanilla ``RadixCache`` fed the same operations; KV read back from the pool is compared
with what was written (exact where uncompressed, within the codec's own round-trip error where restored).
"""

from __future__ import annotations

import dataclasses
import random
import time

import pytest
import torch
from conftest import rel_err

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import Driver, build_cache, build_pool, random_workload

FUTURE = 1e9  # a "now" after every idle threshold




def make(codec, artifact, slots: int, ps: int, **cfg):
    _, allocator = build_pool(artifact.spec, slots, ps)
    config = KVTCCacheConfig(calibration="unused-in-tests", **{"encode": "inline", **cfg})
    return build_cache(allocator, ps, codec, config)


@pytest.mark.parametrize("ps", [1, 16])
def test_cold_node_compressed_and_restored(codec, artifact, bank, codec_err, ps):
    cache = make(codec, artifact, 2048, ps, window_tokens=128, idle_seconds=5.0)
    drv = Driver(cache, bank)
    seq = list(range(1000, 1300))
    drv.finish(drv.start(seq))
    free_before = cache.token_to_kv_pool_allocator.available_size()
    assert cache.compress_idle(now=time.monotonic()) == 0  # nothing idle yet
    freed = cache.compress_idle(now=FUTURE)  # net of the pages the store borrowed
    sink_end, hi = (4, 172) if ps == 1 else (16, 160)
    assert cache.stats.compressed_tokens == hi - sink_end and 0 < cache.store.num_slots < hi - sink_end
    assert freed == hi - sink_end - cache.store.num_slots
    assert cache.token_to_kv_pool_allocator.available_size() == free_before + freed
    [(node, entry)] = cache.io.entries.items()
    assert (entry.start, entry.num_tokens) == (sink_end, hi - sink_end)
    check_invariants(cache)
    n, k, v = drv.read_prefix([*seq, 7])
    assert n == 300 // ps * ps
    ref_k, ref_v = bank.k[:, :n], bank.v[:, :n]
    assert torch.equal(k[:, :sink_end], ref_k[:, :sink_end]) and torch.equal(v[:, hi:], ref_v[:, hi:])
    assert rel_err(k, ref_k) <= 1.2 * codec_err and rel_err(v, ref_v) <= 1.2 * codec_err
    assert cache.stats.restores == 1 and not cache.io.entries
    check_invariants(cache)
    # The restored node kept its blob: going cold again frees its slots without encoding anything.
    assert cache.stats.retained_tokens == hi - sink_end
    seconds = cache.stats.compress_seconds
    assert cache.compress_idle(now=FUTURE) == hi - sink_end
    assert cache.stats.reused_blobs == 1 and cache.stats.compress_seconds == seconds
    check_invariants(cache)


def test_locked_nodes_are_never_compressed(codec, artifact, bank):
    cache = make(codec, artifact, 2048, 1, window_tokens=16, idle_seconds=0.0)
    drv = Driver(cache, bank)
    held = drv.start(list(range(400)))
    assert cache.compress_idle(now=FUTURE) == 0
    drv.finish(held)
    assert cache.compress_idle(now=FUTURE) == 400 - 16 - 4 - cache.store.num_slots
    assert cache.stats.compressed_tokens == 400 - 16 - 4


def test_insert_through_compressed_node_adopts_fresh_kv(codec, artifact, bank):
    cache = make(codec, artifact, 2048, 1, window_tokens=8, idle_seconds=0.0)
    drv = Driver(cache, bank)
    drv.finish(drv.start(list(range(200))))
    cache.compress_idle(now=FUTURE)
    assert cache.io.entries
    # Insert the same tokens with the request's own KV: the node takes the request's slots (no allocation,
    # no decode, exact KV) and keeps its blob; prefix_len ends where the compressed node began.
    allocator = cache.token_to_kv_pool_allocator
    from array import array

    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    slots = allocator.alloc(200)
    drv.kv.scatter(slots, bank.k[:, :200], bank.v[:, :200])
    free_before = allocator.available_size()
    res = cache.insert(InsertParams(key=RadixKey(array("q", range(200))), value=slots))
    assert res.prefix_len == 4 and not cache.io.entries and cache.stats.restores == 0
    assert allocator.available_size() == free_before + 8  # nothing allocated; the device tail gave its copy back
    assert cache.stats.adopted_tokens == 188 and cache.stats.retained_tokens == 188
    allocator.free(slots[: res.prefix_len])  # duplicates, as SGLang's _insert_cache frees them
    n, k, v = drv.read_prefix(list(range(200)))
    assert n == 200 and torch.equal(k, bank.k[:, :200]) and torch.equal(v, bank.v[:, :200])
    check_invariants(cache)


def test_corrupted_blob_is_a_cache_miss(codec, artifact, bank):
    cache = make(codec, artifact, 2048, 1, window_tokens=8, idle_seconds=0.0)
    drv = Driver(cache, bank)
    seq = list(range(300))
    drv.finish(drv.start(seq))
    cache.compress_idle(now=FUTURE)
    [(node, entry)] = cache.io.entries.items()
    blob = cache.store.get(entry.handle)
    blob[blob.numel() // 2] ^= 0x5A
    cache.store.free(entry.handle)
    cache.io.entries[node] = dataclasses.replace(entry, handle=cache.store.put(blob))
    n, k, _ = drv.read_prefix(seq)
    assert n == entry.start  # the match stops before the corrupted node: recompute, never wrong KV
    assert torch.equal(k, bank.k[:, :n])
    assert cache.stats.checksum_failures == 1 and not cache.io.entries
    check_invariants(cache)


def test_restore_without_memory_is_a_shorter_match(codec, artifact, bank):
    cache = make(codec, artifact, 1024, 1, window_tokens=8, idle_seconds=0.0, store_fraction=0.25)
    drv = Driver(cache, bank)
    drv.finish(drv.start(list(range(300))))
    cache.compress_idle(now=FUTURE)
    allocator = cache.token_to_kv_pool_allocator
    hog = allocator.alloc(allocator.available_size())  # a running batch holds every free slot
    n, _, _ = drv.read_prefix(list(range(300)))
    assert n == 4 and cache.stats.restore_no_memory == 1 and cache.io.entries
    check_invariants(cache, held_slots=hog.numel())
    allocator.free(hog)
    n, _, _ = drv.read_prefix(list(range(300)))
    assert n == 300 and cache.stats.restores == 1


def test_pressure_compresses_before_evicting(codec, artifact, bank):
    """The tick encodes cold nodes ahead of need; admission's evict frees them instead of dropping KV."""
    cache = make(codec, artifact, 600, 1, window_tokens=16)  # 743 tokens do not fit
    drv = Driver(cache, bank)
    kept = drv.start(list(range(5000, 5200)))  # locked: must come back exact
    for i in range(3):
        drv.finish(drv.start([i, *range(10_000 + 200 * i, 10_000 + 200 * i + 180)]))
    assert cache.stats.compressions > 0 and cache.stats.dropped_tokens == 0
    n, k, _ = drv.read_prefix(list(range(5000, 5200)))
    assert n == 200 and torch.equal(k, bank.k[:, :200])
    for i in range(3):  # every earlier sequence is still cached (compressed), none evicted
        assert drv.match([i, *range(10_000 + 200 * i, 10_000 + 200 * i + 180)])[0] == 181
    drv.finish(kept)
    check_invariants(cache)


def test_reset_and_allocator_clear_keep_accounting(codec, artifact, bank):
    cache = make(codec, artifact, 1024, 16, window_tokens=16, idle_seconds=0.0)
    drv = Driver(cache, bank)
    drv.finish(drv.start(list(range(300))))
    cache.compress_idle(now=FUTURE)
    cache.reset()  # what SGLang's flush_cache does, followed by allocator.clear()
    cache.token_to_kv_pool_allocator.clear()
    assert cache.store.num_slots == 0 and not cache.io.entries
    drv.finish(drv.start(list(range(100))))
    check_invariants(cache)


@pytest.mark.parametrize("ps", [1, 16])
def test_randomized_against_vanilla_radix_cache(codec, artifact, bank, codec_err, ps):
    """Big pools (no eviction): KVTC compresses idle nodes yet matches exactly what vanilla matches."""
    rng = random.Random(1234 + ps)
    vanilla = build_cache(build_pool(artifact.spec, 16384, ps)[1], ps)
    kvtc = make(codec, artifact, 16384, ps, window_tokens=8, idle_seconds=0.0, min_tokens=16)
    dv, dk = Driver(vanilla, bank), Driver(kvtc, bank)
    running: list[tuple] = []
    for step, (seq, u) in enumerate(random_workload(rng, 700, 50, 400)):
        if u < 0.3:  # a lookup only, with the KV read back
            nv, kv_v, vv_v = dv.read_prefix(seq)
            nk, kv_k, vv_k = dk.read_prefix(seq)
            assert nv == nk, f"step {step}: vanilla matched {nv}, kvtc {nk}"
            if nk:
                assert rel_err(kv_k, kv_v) <= 1.5 * codec_err + 1e-3 and rel_err(vv_k, vv_v) <= 1.5 * codec_err + 1e-3
                assert torch.equal(kv_k[:, :4], kv_v[:, :4])  # sinks are exact
        else:
            rv, rk = dv.start(seq), dk.start(seq)
            assert rv.matched == rk.matched, f"step {step}: vanilla matched {rv.matched}, kvtc {rk.matched}"
            running.append((rv, rk))
        while running and (len(running) > 4 or rng.random() < 0.5):
            rv, rk = running.pop(rng.randrange(len(running)))
            dv.finish(rv)
            dk.finish(rk)
        if step % 7 == 0:
            kvtc.compress_idle(now=FUTURE)
        if step % 50 == 0:
            check_invariants(vanilla)
            check_invariants(kvtc)
    assert kvtc.stats.compressions > 20 and kvtc.stats.restores > 5
    assert dv.hit_tokens == dk.hit_tokens
    check_invariants(kvtc)


def test_randomized_under_memory_pressure(codec, artifact, bank):
    """Small pools: KVTC keeps more cached than vanilla; nothing leaks, locked KV is never touched."""
    rng = random.Random(99)
    vanilla = build_cache(build_pool(artifact.spec, 1536, 1)[1], 1)
    kvtc = make(codec, artifact, 1536, 1, window_tokens=16, store_fraction=0.2)
    dv, dk = Driver(vanilla, bank), Driver(kvtc, bank)
    held = []
    for step, (seq, _) in enumerate(random_workload(rng, 400, 30, 300)):
        rk = dk.start(seq)
        dv_req = dv.start(seq)
        if rk is not None:
            held.append(rk)
        if dv_req is not None:
            dv.finish(dv_req)
        while len(held) > 2:
            req = held.pop(0)
            n, k, _ = dk.read_prefix(req.tokens)  # a locked request's prefix is intact
            assert n >= len(req.tokens) - 1 and rel_err(k, bank.k[:, :n]) < 0.2
            dk.finish(req)
        if step % 40 == 0:
            check_invariants(kvtc)
    assert kvtc.stats.compressions > 0
    assert dk.hit_tokens > dv.hit_tokens, (dk.hit_tokens, dv.hit_tokens)
    check_invariants(kvtc)


def test_full_store_never_drops_an_ancestor_of_the_node_being_compressed(codec, artifact, bank):
    """Regression: making room for a node's blob must not drop a compressed ancestor (that would drop
    the node itself and free its slots twice)."""
    cache = make(codec, artifact, 2048, 1, window_tokens=8, idle_seconds=0.0, min_tokens=8)
    drv = Driver(cache, bank)
    seq = list(range(600))
    drv.finish(drv.start(seq))
    cache.compress_idle(now=FUTURE)
    assert len(cache.io.entries) == 1  # [4, 592) compressed; the 8-token tail stays on device
    filler = cache.store.put(torch.zeros(cache.store.room_bytes, dtype=torch.uint8))  # the store is full
    cache.policy.window = 0  # now the tail may compress too
    assert cache.compress_idle(now=FUTURE) == 0 and cache.stats.store_full == 1
    assert len(cache.io.entries) == 1 and cache.stats.dropped_tokens == 0
    check_invariants(cache)
    cache.store.free(filler)
    assert drv.read_prefix(seq)[0] == 600


def test_batched_compression_skips_a_node_dropped_for_an_earlier_one(codec, artifact, bank):
    """One evict() batch compresses A then B; making store room for A drops compressed X, B's parent, and
    B with it. B's blob must then be discarded: its slots were already freed with X's subtree."""
    from array import array

    from sglang.srt.mem_cache.radix_cache import RadixKey

    cache = make(codec, artifact, 2048, 1, window_tokens=8, idle_seconds=0.0, min_tokens=8)
    drv = Driver(cache, bank)
    seq1, seq2 = list(range(600)), list(range(1000, 1500))
    drv.finish(drv.start(seq1))
    cache.compress_idle(now=FUTURE)  # X = seq1[4:592) compressed; B = seq1[592:600) stays on device
    drv.finish(drv.start(seq2))  # A = seq2, on device
    x_node, b_node = cache._path_to(cache._match(RadixKey(array("q", seq1)), split=False)[3])[-2:]
    assert x_node in cache.io.entries and b_node.value is not None
    b_node.last_access_time = time.monotonic() + 10  # A is the least recently used: it goes first
    room = cache.store.room_bytes - 10_000  # A's blob (~0.6 MB) fits only once X's is dropped
    filler = cache.store.put(torch.zeros(room, dtype=torch.uint8))
    cache.policy.window = 0  # B may compress now too
    free_before, store_before = cache.token_to_kv_pool_allocator.available_size(), cache.store.num_slots
    cache.compress_idle(now=FUTURE)
    assert x_node not in cache.io.entries and x_node.parent is None and b_node.value is None  # B went with X
    assert cache.stats.dropped_tokens >= 588
    assert cache.stats.compressions == 2  # X earlier, A now; B's blob discarded
    store_delta = cache.store.num_slots - store_before
    assert cache.token_to_kv_pool_allocator.available_size() == free_before + 496 + 8 - store_delta  # once each
    check_invariants(cache)
    cache.store.free(filler)
    assert drv.read_prefix(seq2)[0] == 500
