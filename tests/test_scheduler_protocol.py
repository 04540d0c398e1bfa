"""KVTCRadixCache under SGLang 0.5.23's own scheduling code (CPU): real ``Req``s, ``SchedulePolicy`` (fcfs,
lpm), ``PrefillAdder``/``PrefillBudget``/``add_one_req`` (which calls ``init_load_back``), ``release_kv_cache``
(``RadixCache.checkpoint``) inside the allocator's free groups, real pools and real SmolLM2 K/V.

Only the model forward is replaced: ``_forward`` allocates the request's extend slots and writes its K/V
rows from the bank, as ``prepare_for_extend`` plus the forward pass would."""

from __future__ import annotations

from array import array

import pytest
import torch
from sglang.srt.managers.schedule_batch import FINISH_LENGTH, Req
from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder, SchedulePolicy
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.common import evict_from_tree_cache, release_kv_cache
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.runtime_context import SpawnRanks, publish, reset_context
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.server_args import ServerArgs

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.cache.radix import KVTCRadixCache
from kvtc_sglang.cache.tree_walk import subtree_postorder
from kvtc_sglang.cache.wanted import IDLE_TICKS
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import BankKV, build_pool

FUTURE = 1e9


@pytest.fixture(scope="module", autouse=True)
def runtime_context():
    """SGLang's process-wide config, published as its own tests do (``published_topology``)."""
    reset_context()
    publish(ServerArgs(model_path="dummy", device="cpu"), role="test", ranks=SpawnRanks(world_rank=0, dp_rank=None))
    yield
    reset_context()



class Sched:
    """The cache, pools and the scheduler's calls around them."""

    def __init__(self, codec, slots: int, ps: int = 1, vanilla: bool = False, **cfg) -> None:
        self.pool, self.allocator = build_pool(codec.spec, slots, ps)
        self.rtp = ReqToTokenPool(size=16, max_context_len=slots + 64, device="cpu", enable_memory_saver=False)
        params = CacheInitParams(
            disable=False, req_to_token_pool=self.rtp, token_to_kv_pool_allocator=self.allocator, page_size=ps,
            enable_kv_cache_events=True,
        )
        defaults = {"window_tokens": 8, "idle_seconds": 0.0, "encode": "inline"}
        config = KVTCCacheConfig(calibration="unused", **{**defaults, **cfg})
        self.cache = RadixCache(params) if vanilla else KVTCRadixCache(params, codec, config)
        self.ps = ps
        self.n = 0

    def req(self, tokens: list[int], max_new: int = 8) -> Req:
        self.n += 1
        r = Req(f"r{self.n}", "", array("q", tokens), SamplingParams(max_new_tokens=max_new))
        r.init_next_round_input(self.cache)
        return r

    def schedule(self, waiting: list[Req], policy: str = "fcfs") -> list[Req]:
        """One pass of ``Scheduler.get_new_batch_prefill``'s admission loop."""
        SchedulePolicy(policy, self.cache, False, False, False).calc_priority(waiting)
        adder = PrefillAdder(self.ps, self.cache, self.allocator, None, 0.5, 1 << 20, None)
        for r in waiting:
            r.init_next_round_input(self.cache)
            if adder.add_one_req(r, has_chunked_req=False, truncation_align_size=None) != AddReqResult.CONTINUE:
                break
        return adder.can_run_list

    def forward(self, r: Req, bank: BankKV) -> None:
        """Allocate the extend slots (evicting through the cache, as the allocator does) and write K/V."""
        fill = len(r.full_untruncated_fill_ids)
        self.rtp.alloc([r])
        prefix = self.cache.prefix_device_indices(r)  # [prefix_len]
        n_new = fill - r.prefix_len
        alloc_n = -(-n_new // self.ps) * self.ps
        evict_from_tree_cache(self.cache, alloc_n)
        slots = self.allocator.alloc(alloc_n)
        assert slots is not None, "the admitted request did not get its slots"
        row = self.rtp.req_to_token[r.kv.req_pool_idx]
        row[: r.prefix_len] = prefix.to(row.dtype)
        row[r.prefix_len : fill] = slots[:n_new].to(row.dtype)
        k, v = bank.kv(list(r.full_untruncated_fill_ids), r.prefix_len)
        kv = self.cache.ctl.kv if isinstance(self.cache, KVTCRadixCache) else None
        if kv is not None:
            kv.scatter(slots[:n_new], k, v)
        else:
            for layer in range(k.shape[0]):
                self.pool.k_buffer[layer][slots[:n_new]] = k[layer]
                self.pool.v_buffer[layer][slots[:n_new]] = v[layer]
        r.kv.kv_allocated_len = r.kv.kv_committed_len = fill

    def finish(self, r: Req) -> None:
        """``release_kv_cache`` with its checkpoint, inside a deferred-free group, as the result processor."""
        r.finished_reason = FINISH_LENGTH(length=0)
        self.allocator.free_group_begin()
        try:
            release_kv_cache(r, self.cache, checkpoint=True)
        finally:
            self.allocator.free_group_end()

    def serve(self, tokens: list[int], bank: BankKV) -> None:
        [r] = self.schedule([self.req(tokens)])
        self.forward(r, bank)
        self.finish(r)


def seqs(n: int, length: int, shared: int = 0) -> list[list[int]]:
    return [list(range(shared)) + [100_000 * (i + 1) + j for j in range(length - shared)] for i in range(n)]


@pytest.mark.parametrize("policy", ["lpm", "fcfs"])
def test_matching_waiting_requests_restores_nothing(codec, bank, policy):
    """Selection (lpm matches every waiting request) leaves the compressed store alone; only the admitted
    requests' prefixes are restored, each whole."""
    s = Sched(codec, 1024)
    convs = seqs(6, 120)
    for t in convs:
        s.serve(t, bank)
    s.cache.compress_idle(now=FUTURE)
    compressed = len(s.cache.io.entries)
    assert compressed == 6
    waiting = [s.req(t + [7, 8, 9]) for t in convs]
    # [0, 4) sinks on device, [4, 112) compressed, [112, 120) the device window leaf below it
    assert all((r.prefix_len, r.host_hit_length) == (4, 116) for r in waiting)
    SchedulePolicy(policy, s.cache, False, False, False).calc_priority(waiting)
    assert s.cache.stats.restores == 0 and len(s.cache.io.entries) == compressed
    # A pool with room for about two of them: restores happen for the admitted requests only.
    hog = s.allocator.alloc(s.allocator.available_size() - 150)
    admitted = s.schedule(waiting, policy)
    loaded = [r for r in admitted if r.host_loaded_length]
    assert 1 <= len(admitted) < len(waiting) and loaded
    assert s.cache.stats.restores == len(loaded) == s.cache.stats.load_backs
    for r in loaded:
        assert r.host_loaded_length == r.host_hit_length == 116 and r.prefix_len == 120
        assert r.kv.cache_protected_len == 120  # the loaded slots are the tree's
    for r in waiting:
        if r not in admitted:
            assert r.host_loaded_length == 0
    for r in admitted:
        s.forward(r, bank)
        k = torch.stack([b[s.rtp.req_to_token[r.kv.req_pool_idx, :120].long()] for b in s.cache.ctl.kv.k_buffers])
        ref = bank.kv(list(r.origin_input_ids), 0)[0][:, :120]  # [L, 120, H, D]
        assert ((k.float() - ref.float()).norm() / ref.float().norm()) < 0.2
        s.finish(r)
    s.allocator.free(hog)
    check_invariants(s.cache)


def test_load_back_is_all_or_nothing(codec, bank):
    """A request whose compressed path holds a damaged blob loads nothing (and recomputes)."""
    import dataclasses

    s = Sched(codec, 2048)
    base = list(range(300))
    s.serve(base, bank)
    s.serve(base[:200] + [50_000 + i for i in range(100)], bank)
    s.cache.compress_idle(now=FUTURE)
    r = s.req(base + [1, 2])
    assert r.host_hit_length == 296
    node = next(n for n, e in s.cache.io.entries.items() if e.start == 200 and n.key.token_ids[0] == 200)
    entry = s.cache.io.entries[node]
    blob = s.cache.store.get(entry.handle)
    blob[-5] ^= 0x21
    s.cache.store.free(entry.handle)
    s.cache.io.entries[node] = dataclasses.replace(entry, handle=s.cache.store.put(blob))
    [r] = s.schedule([r])
    assert r.host_loaded_length == 0 and r.prefix_len == 4  # nothing of the promised 296, not 196 of them
    assert s.cache.stats.checksum_failures == 1 and s.cache.stats.load_back_failures == 1
    s.forward(r, bank)
    s.finish(r)
    check_invariants(s.cache)


@pytest.mark.parametrize("ps", [1, 16])
def test_request_as_long_as_vanilla_serves_is_admitted(codec, bank, ps):
    """With the store holding compressed KV, a request of nearly the whole pool is still admitted (the
    store gives its pages back), as vanilla admits it at the same pool size: at once, or with the
    just-compressed (wanted) blobs protected, once nothing has run for ``IDLE_TICKS`` scheduler passes."""
    size = 1024
    s, v = Sched(codec, size, ps), Sched(codec, size, ps, vanilla=True)
    for t in seqs(5, 150):
        s.serve(t, bank)
        v.serve(t, bank)
    s.cache.compress_idle(now=FUTURE)
    assert s.cache.store.num_slots > 0 and s.cache.io.entries
    assert s.cache.evictable_size() + s.allocator.available_size() + s.cache.protected_size() == size
    long = [900_000 + i for i in range(size - 8 - 2 * ps)]  # within a page of the longest vanilla admits
    [r] = v.schedule([v.req(long, max_new=8)])
    v.forward(r, bank)
    v.finish(r)
    r = s.req(long, max_new=8)
    assert s.cache._wanted_slots() > 0 and not s.schedule([r])  # the blobs just compressed are wanted
    for _ in range(IDLE_TICKS):
        s.cache.scheduler_tick()  # the scheduler's passes with nothing running
    assert s.schedule([r]) == [r]
    s.forward(r, bank)
    s.finish(r)
    assert s.cache.stats.dropped_tokens > 0 and s.cache.store.num_slots == 0
    check_invariants(s.cache)


def test_checkpoint_in_free_group_with_idle_zero_keeps_exact_kv(codec, bank):
    """Two requests admitted in one pass share 300 tokens; the longer finishes first and is compressed (what
    ``evict`` does to an encoded node under pressure). The other's release_kv_cache checkpoint then inserts
    through that compressed node, which it covers only in part, inside a free group: nothing is allocated,
    nothing restored, and the tree keeps the request's own exact rows for the part it covers."""
    s = Sched(codec, 2048, idle_watermark=0.0)
    long_seq = list(range(400))
    short_seq = long_seq[:300] + [70_000 + i for i in range(50)]
    a, b = s.schedule([s.req(short_seq), s.req(long_seq)])
    assert a.prefix_len == b.prefix_len == 0
    s.forward(a, bank)
    s.forward(b, bank)
    own = s.rtp.req_to_token[a.kv.req_pool_idx, :350].long().clone()
    s.finish(b)
    s.cache.compress_idle()  # idle 0: b's KV is compressed at once
    [(node, entry)] = s.cache.io.entries.items()
    assert (entry.start, entry.num_tokens) == (4, 388)
    available = s.allocator.available_size()
    s.finish(a)  # checkpoint + frees inside free_group_begin/end
    assert s.allocator.available_size() >= available  # nothing was allocated inside the group
    assert s.cache.stats.restores == 0 and s.cache.stats.adopted_tokens == 296
    path = s.cache._path_to(s.cache._match(RadixKey(array("q", short_seq)), split=False)[3])
    assert [len(n.key) for n in path] == [4, 296, 50]
    assert torch.equal(path[1].value, own[4:300]) and torch.equal(path[2].value, own[300:350])
    check_invariants(s.cache)
    # The part a did not cover stays compressed and still restores, for an admitted request only.
    r = s.req(long_seq + [1])
    assert (r.prefix_len, r.host_hit_length) == (300, 100)  # [300, 392) compressed + the 8-token leaf
    [r] = s.schedule([r])
    assert r.prefix_len == 400 and s.cache.stats.restores == 1
    s.forward(r, bank)
    rows = s.rtp.req_to_token[r.kv.req_pool_idx, :400].long()
    k = torch.stack([buf[rows] for buf in s.cache.ctl.kv.k_buffers])  # [L, 400, H, D]
    assert torch.equal(k[:, :300], bank.k[:, :300])
    assert ((k.float() - bank.k[:, :400].float()).norm() / bank.k[:, :400].float().norm()) < 0.2
    s.finish(r)
    check_invariants(s.cache)


def test_dropped_compressed_nodes_emit_removal_events(codec, bank):
    """Evicting everything (a request needs the whole pool) emits the removal of every cached page (page
    size 1: one block hash per token), the compressed nodes' included, as vanilla does for its nodes."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    s = Sched(codec, 1024)
    for t in seqs(3, 150):
        s.serve(t, bank)
    s.cache.compress_idle(now=FUTURE)
    s.cache.take_events()
    nodes = [n for n, _ in subtree_postorder(s.cache.root_node) if n is not s.cache.root_node]
    compressed = len(s.cache.io.entries)
    assert compressed == 3 and len(nodes) == 9  # sinks, compressed middles, window leaves
    s.cache.evict(EvictParams(num_tokens=1024))
    removed = [e for e in s.cache.take_events() if type(e).__name__ == "BlockRemoved"]
    assert not s.cache.root_node.children and s.cache.stats.dropped_nodes == compressed
    assert sum(len(e.block_hashes) for e in removed) == sum(len(n.key) for n in nodes) == 3 * 150
    assert s.allocator.available_size() == 1024
    check_invariants(s.cache)


def test_speculative_decoding_is_refused():
    from types import SimpleNamespace

    from kvtc_sglang.cache.factory import check_context

    ctx = SimpleNamespace(
        disable_radix_cache=False, enable_hierarchical_cache=False, tp_size=1, is_hybrid_swa=False,
        is_hybrid_ssm=False, is_dsa=False, server_args=SimpleNamespace(speculative_algorithm="STANDALONE"),
    )
    with pytest.raises(ValueError, match="speculative decoding"):
        check_context(ctx)
