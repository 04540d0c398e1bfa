"""The encode governor (cache/governor.py): encoding pauses while blobs are dropped before any restore.

Reference first: a plain-Python model of the rule (pause once ``window`` tokens were wasted and they exceed
``share`` of all outcomes; pauses double; a restore resumes), then the class against it, then the real cache
(real SGLang pool, allocator and radix cache, real SmolLM2 K/V) under a workload whose blobs all die unused.
"""

from __future__ import annotations

import pytest

from kvtc_sglang.cache.governor import MAX_PAUSE, MIN_PAUSE, EncodeGovernor
from kvtc_sglang.cache.stats import KVTCStats


def paused_after_ref(events: list[tuple[int, int]], window: int, share: float) -> list[bool]:
    """``events[i] = (wasted, useful)`` tokens at busy pass ``i`` -> paused after each pass."""
    wasted = useful = 0.0
    until, pause, clock, out = 0, MIN_PAUSE, 0, []
    for dw, du in events:
        wasted, useful, clock = wasted + dw, useful + du, clock + 1
        if wasted + useful > 4 * window:
            wasted, useful = wasted / 2, useful / 2
        if clock >= until and share < 1 and wasted >= window:
            if wasted > share * (wasted + useful):
                until, pause, wasted, useful = clock + pause, min(2 * pause, MAX_PAUSE), 0.0, 0.0
            else:
                pause = MIN_PAUSE
        out.append(clock < until)
    return out


def drive(gov: EncodeGovernor, events: list[tuple[int, int]], busy: bool = True) -> list[bool]:
    stats, out = KVTCStats(), []
    for dw, du in events:
        stats.dropped_unused_tokens += dw
        stats.restored_tokens += du
        gov.on_tick(stats, busy)
        out.append(gov.paused)
    return out


@pytest.mark.parametrize("share", [0.5, 0.75, 0.9, 1.0])
def test_the_governor_follows_the_reference_rule(share):
    events = (
        [(100, 0)] * 12  # wasted only: a pause at the 10th pass
        + [(0, 0)] * (MIN_PAUSE + 5)  # it ends; 200 tokens wasted meanwhile are not enough to decide
        + [(100, 0)] * 12  # a second, longer pause
        + [(0, 0)] * (2 * MIN_PAUSE)
        + [(100, 400)] * 30  # mostly restored: no pause, and the next one is short again
        + [(150, 0)] * 20
    )
    got = drive(EncodeGovernor(1000, share), events)
    assert got == paused_after_ref(events, 1000, share)
    if share < 1:
        assert got[9] and not got[8]  # the 10th pass brought 1,000 wasted tokens
        assert not got[9 + MIN_PAUSE] and got[9 + MIN_PAUSE - 1]  # the first pause lasts MIN_PAUSE passes
        assert not any(got[-50:-20])
    else:
        assert not any(got)


def test_pauses_double_up_to_the_cap_and_a_restore_resets_them():
    gov, stats = EncodeGovernor(10, 0.9), KVTCStats()
    lengths = []
    for _ in range(7):
        stats.dropped_unused_tokens += 10
        gov.on_tick(stats, busy=True)
        n = 0
        while gov.paused:
            gov.on_tick(stats, busy=True)
            n += 1
        lengths.append(n)
    assert lengths == [min(MIN_PAUSE << i, MAX_PAUSE) for i in range(7)]
    assert stats.encode_pauses == 7
    stats.dropped_unused_tokens += 40
    stats.restored_tokens += 1000  # mostly restores (the totals halve: still over the window)
    gov.on_tick(stats, busy=True)
    assert gov.pause == MIN_PAUSE and not gov.paused


def test_idle_passes_do_not_run_a_pause_down_and_useful_outcomes_prevent_one():
    gov, stats = EncodeGovernor(100, 0.9), KVTCStats()
    stats.dropped_unused_tokens = 100
    gov.on_tick(stats, busy=True)
    assert gov.paused
    for _ in range(10 * MIN_PAUSE):
        gov.on_tick(stats, busy=False)
    assert gov.paused  # nothing ran: the scheduler's idle spin is no evidence
    gov2, stats2 = EncodeGovernor(100, 0.9), KVTCStats()
    stats2.dropped_unused_tokens, stats2.restored_tokens = 900, 200  # 82% wasted: under 90%
    gov2.on_tick(stats2, busy=True)
    assert not gov2.paused and stats2.encode_pauses == 0


def test_clear_forgets_outcomes_but_not_the_counters_already_seen():
    gov, stats = EncodeGovernor(100, 0.9), KVTCStats()
    stats.dropped_unused_tokens = 90
    gov.on_tick(stats, busy=True)
    gov.clear()
    stats.dropped_unused_tokens += 20  # 20 new, not 110
    gov.on_tick(stats, busy=True)
    assert not gov.paused and gov.wasted == 20


@pytest.mark.parametrize("window, share", [(0, 0.9), (10, 0.0), (10, 1.5)])
def test_bad_arguments_are_refused(window, share):
    with pytest.raises(ValueError, match="window|max_waste_share"):
        EncodeGovernor(window, share)


def test_config_refuses_a_bad_share():
    from kvtc_sglang.cache.config import KVTCCacheConfig

    with pytest.raises(ValueError, match="max_waste_share must be in"):
        KVTCCacheConfig(calibration="t", max_waste_share=0.0)


def host_hit(cache, tokens: list[int]) -> int:
    from array import array

    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    return cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens)))).host_hit_length


@pytest.mark.model
def test_the_cache_stops_encoding_what_it_drops_unused_and_probes_again_later(codec, bank):
    from kvtc_sglang.cache.config import KVTCCacheConfig
    from kvtc_sglang.workloads.invariants import check_invariants
    from kvtc_sglang.workloads.replay import Driver, build_cache, build_pool

    _, allocator = build_pool(codec.spec, 1024, 1)
    config = KVTCCacheConfig(calibration="t", window_tokens=16, idle_watermark=0.0, ready_fraction=1.0,
                             encode="inline", store_fraction=0.1)  # fmt: skip
    cache = build_cache(allocator, 1, codec, config)
    drv = Driver(cache, bank)
    running = drv.start(list(range(50_000, 50_032)))  # a request that stays running: every pass is busy
    seqs = [list(range(1000 * (i + 1), 1000 * (i + 1) + 400)) for i in range(40)]
    encoded_at_pause = None
    for seq in seqs:
        drv.finish(drv.start(seq))
        if cache.governor.paused and encoded_at_pause is None:
            encoded_at_pause = (cache.stats.encoded_tokens, cache.stats.inline_encoded_tokens)
    check_invariants(cache)
    assert cache.stats.restored_tokens == 0 and cache.stats.encode_pauses >= 1
    assert encoded_at_pause is not None and cache.governor.paused
    # paused: later sessions were evicted as SGLang's own cache would, nothing more was encoded
    assert (cache.stats.encoded_tokens, cache.stats.inline_encoded_tokens) == encoded_at_pause
    assert cache.stats.dropped_unused_tokens + cache.stats.discarded_encoded_tokens >= cache.governor.window
    # a session whose blob survived comes back: blobs made before the pause are still restored
    back = next(s for s in reversed(seqs) if host_hit(cache, s) > 0)
    drv.finish(drv.start(back))
    assert cache.stats.restored_tokens > 0
    for _ in range(4 * MAX_PAUSE):  # busy passes (a request runs): the pause runs out
        drv.tick()
        if not cache.governor.paused:
            break
    assert not cache.governor.paused
    encoded = cache.stats.encoded_tokens
    drv.finish(drv.start(list(range(900_000, 900_400))))
    drv.tick()
    assert cache.stats.encoded_tokens > encoded  # encoding again (a probe)
    drv.finish(running)
    check_invariants(cache)
