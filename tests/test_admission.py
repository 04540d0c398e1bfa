"""What SGLang's admission may take from kvtc, on the real pool, allocator, radix cache and ``PrefillBudget``
with real SmolLM2 K/V (issue 18: on SGLang's agentic trace every compressed blob was dropped, in admission's
allocations, before its owner's next turn came back: 0 restores).

The store slots of blobs compressed, or reached by a scheduler match (or SGLang's FCFS refresh,
``touch_prefix``), within ``WANTED_TICKS`` passes are protected, not evictable: admission cannot shed ~17
cached tokens per slot, before their owner's next turn, to admit another request. Once nothing has run for
two scheduler passes they are evictable again (a request that fits the pool only with them must not wait
forever).
"""

from __future__ import annotations

from array import array

import pytest
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.prefill_budget import PrefillBudget
from sglang.srt.mem_cache.radix_cache import RadixKey

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.cache.wanted import WANTED_TICKS
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import Driver, build_cache, build_pool

pytestmark = pytest.mark.model


def make(codec, slots: int, ps: int = 1):
    _, allocator = build_pool(codec.spec, slots, ps)
    config = KVTCCacheConfig(calibration="t", window_tokens=16, idle_watermark=0.9, encode="inline",
                             protect_wanted=True)
    return build_cache(allocator, ps, codec, config)


def _waiting_match(cache, tokens: list[int]):
    return cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))


@pytest.mark.parametrize("ps", [1, 16])
def test_fresh_and_matched_blobs_are_not_admission_room_while_others_run(codec, bank, ps):
    cache = make(codec, 4096, ps)
    drv = Driver(cache, bank)
    conv = list(range(700))
    drv.finish(drv.start(conv))
    cache.compress_idle(now=float("inf"))
    assert cache.io.entries and cache.store.num_slots > 0
    running = drv.start(list(range(9000, 9300)))  # another request runs (locked)
    cache.scheduler_tick()  # the next scheduler pass sees it running
    budget = PrefillBudget(cache.token_to_kv_pool_allocator, cache)
    alloc = cache.token_to_kv_pool_allocator
    everything = alloc.available_size() + cache.evictable_size_ + cache.store.num_slots

    wanted = cache._wanted_slots()  # just compressed: fresh
    assert 0 < wanted <= cache.store.num_slots
    assert budget.remaining_total == everything - wanted  # SGLang's admission does not count them
    assert cache.protected_size() == cache.protected_size_ + wanted
    check_invariants(cache)
    for _ in range(WANTED_TICKS + 1):
        cache.scheduler_tick()
    assert cache._wanted_slots() == 0 and not cache.wanted  # nobody asked for it since: room again
    assert budget.remaining_total == everything

    m = _waiting_match(cache, [*conv, 1, 2, 3])  # the conversation's next turn waits in the queue
    assert m.host_hit_length > 0 and cache._wanted_slots() == wanted
    for _ in range(WANTED_TICKS + 1):
        cache.scheduler_tick()
    cache.touch_prefix(RadixKey(array("q", [*conv, 1, 2, 3])))  # SGLang's FCFS refresh of waiting prefixes
    assert cache._wanted_slots() == wanted
    check_invariants(cache)

    drv.finish(running)  # nothing runs: two passes later every store slot is admission room again
    cache.scheduler_tick()
    assert cache._wanted_slots() == wanted  # the pass right after: admission may still fit without them
    cache.scheduler_tick()
    assert cache._wanted_slots() == 0
    assert budget.remaining_total == alloc.available_size() + cache.evictable_size_ + cache.store.num_slots
    running = drv.start(list(range(9000, 9300)))
    cache.scheduler_tick()  # something runs again: the mark still holds
    assert cache._wanted_slots() == wanted

    n, _, _ = drv.read_prefix([*conv, 1, 2, 3])  # admitted: restored (the blob is kept, no longer compressed)
    assert n == 700 // ps * ps and cache.stats.restores >= 1 and cache.stats.restore_no_memory == 0
    cache.scheduler_tick()
    assert cache._wanted_slots() == 0 and not cache.wanted
    drv.finish(running)
    check_invariants(cache)
