"""``protect_wanted`` never starves a waiting request, under SGLang 0.5.23's own admission (real ``Req``s,
``SchedulePolicy`` fcfs and lpm, ``PrefillAdder``; the harness of ``test_scheduler_protocol``).

Wanted blobs' store slots are not admission room, so a newcomer that fits the pool only with them waits
while other requests run (FCFS stops at it, so the runners drain and the idle release lets it in; ``lpm``
admits cached requests around it, and a long generation keeps the pool busy). Once a request the
scheduler keeps matching has waited ``STARVE_TICKS`` passes, the wanted slots are room again until it is in.
"""

from __future__ import annotations

import pytest
from test_scheduler_protocol import FUTURE, Sched, runtime_context, seqs  # noqa: F401 (autouse fixture)

from kvtc_sglang.cache.wanted import STARVE_TICKS, WANTED_TICKS
from kvtc_sglang.workloads.invariants import check_invariants

pytestmark = pytest.mark.model


@pytest.mark.parametrize("policy", ["fcfs", "lpm"])
def test_a_request_kept_out_by_wanted_blobs_gets_in_after_starve_ticks(codec, bank, policy):
    s = Sched(codec, 1024, protect_wanted=True)  # the K/V bank holds 1,024-token sequences
    for t in seqs(6, 150):
        s.serve(t, bank)
    s.cache.compress_idle(now=FUTURE)
    base = [700_000 + i for i in range(100)]
    s.serve(base, bank)  # on the device: the runner's cached prefix, locked once it is admitted
    runner = s.req(base + [1, 2, 3])  # runs all along: the pool is never idle
    assert s.schedule([runner], policy) == [runner]
    s.forward(runner, bank)
    s.cache.scheduler_tick()
    wanted = s.cache._wanted_slots()
    assert wanted >= 32, f"the test needs the wanted blobs to hold >= 32 store slots, they hold {wanted}"

    room = s.allocator.available_size() + s.cache.evictable_size()  # what admission sees
    newcomer = s.req([800_000 + i for i in range(room + wanted // 2 - 8)], max_new=8)
    waited = None
    for tick in range(STARVE_TICKS + 3):
        if s.schedule([newcomer], policy):
            waited = tick
            break
        assert s.cache._wanted_slots() >= wanted and s.cache.protected_size_ > 0  # still protected, busy
        s.cache.scheduler_tick()
    assert waited is not None, f"kept out {STARVE_TICKS + 3} passes (the marks last {WANTED_TICKS})"
    assert STARVE_TICKS - 2 <= waited <= STARVE_TICKS + 2
    assert s.cache.stats.starving_passes >= 1
    s.forward(newcomer, bank)  # its allocation drops blobs: the wanted slots were room
    assert s.cache.stats.dropped_tokens > 0
    s.finish(newcomer)
    s.finish(runner)
    for _ in range(2):
        s.cache.scheduler_tick()
    assert not s.cache.wanted.starving  # nobody waits any more: the blobs left are protected again
    check_invariants(s.cache)


def test_admitted_requests_are_forgotten(codec, bank):
    """A request admitted with a restore is no longer waiting; one never matched again is forgotten."""
    s = Sched(codec, 2048, protect_wanted=True)
    conv = seqs(1, 300)[0]
    s.serve(conv, bank)
    s.cache.compress_idle(now=FUTURE)
    r = s.req(conv + [5, 6, 7])
    assert r.host_hit_length > 0 and r.rid in s.cache.wanted._waiting
    [r] = s.schedule([r])
    assert r.host_loaded_length > 0 and r.rid not in s.cache.wanted._waiting  # init_load_back: admitted
    s.forward(r, bank)
    s.finish(r)
    other = s.req([900_000 + i for i in range(50)])
    assert other.rid in s.cache.wanted._waiting
    for _ in range(WANTED_TICKS + STARVE_TICKS + 1):
        s.cache.scheduler_tick()
    assert other.rid not in s.cache.wanted._waiting and not s.cache.wanted.starving
