"""Encode work that would be thrown away or repeated, on the real SGLang pool, allocator and radix cache with
real SmolLM2 K/V (the replay driver plays the scheduler).

Two wastes measured on SGLang's agentic trace (BENCHMARKS "Session 14"): encodes of running requests' nodes
whose blobs the store could not take (a pool full of running requests leaves it no page to borrow), and kept
blobs of running requests dropped for the ~1/17 of a slot per token they free, so that the node is encoded
again once it goes cold.
"""

from __future__ import annotations

import pytest
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import Driver, build_cache, build_pool

pytestmark = pytest.mark.model


def make(codec, slots: int, ps: int = 1, **cfg):
    _, allocator = build_pool(codec.spec, slots, ps)
    defaults = {"window_tokens": 16, "idle_watermark": 0.0, "ready_fraction": 1.0, "encode": "inline"}
    return build_cache(allocator, ps, codec, KVTCCacheConfig(calibration="t", **{**defaults, **cfg}))


@pytest.mark.parametrize("ps", [1, 16])
def test_a_running_request_is_not_encoded_while_the_store_could_not_take_its_blob(codec, bank, ps):
    cache = make(codec, 1024, ps)
    drv = Driver(cache, bank)
    run = drv.start(list(range(480)))  # locked until finished: its slots cannot make room for its blob
    allocator = cache.token_to_kv_pool_allocator
    others = allocator.alloc(allocator.available_size())  # the rest of the pool: other running requests' KV
    assert allocator.available_size() == 0 and cache.store.num_pages == 0
    for _ in range(3):
        cache.scheduler_tick()
    assert cache.stats.encodes_deferred >= 1
    assert cache.stats.compress_seconds == 0 and cache.stats.store_full == 0  # no encode made, none thrown away
    allocator.free(others)  # those requests ended: the store may borrow pages again
    cache.scheduler_tick()
    assert cache.stats.encodes >= 1 and cache.io.retained and cache.stats.store_full_tokens == 0
    assert all(n.lock_ref > 0 for n in cache.io.retained)  # encoded ahead, freeable the moment it ends
    drv.finish(run)
    check_invariants(cache)


def test_evict_drops_a_cold_leaf_before_the_kept_blob_of_a_running_request(codec, bank):
    """Dropping a running request's kept blob frees a few store slots but costs a whole encode when the node
    goes cold again; a cold device leaf (recomputed only if asked for again) goes first."""
    cache = make(codec, 2048)
    drv = Driver(cache, bank)
    run = drv.start(list(range(500)))
    cache.scheduler_tick()  # encoded ahead while it runs
    [(node, entry)] = cache.io.retained.items()
    assert node.lock_ref > 0
    short = list(range(9000, 9020))  # a finished request too short to encode: a plain cold leaf
    drv.finish(drv.start(short))
    assert drv.match(short)[0] == 20
    cache.evict(EvictParams(num_tokens=10))
    assert drv.match(short)[0] == 0  # the cold leaf went
    assert cache.io.retained.get(node) is entry and cache.stats.dropped_kept_tokens == 0
    freed = cache.evict(EvictParams(num_tokens=2048)).num_tokens_evicted  # nothing else left: the kept blob goes
    assert freed > 0 and node not in cache.io.retained and cache.stats.dropped_kept_tokens == entry.num_tokens
    drv.finish(run)
    check_invariants(cache)
