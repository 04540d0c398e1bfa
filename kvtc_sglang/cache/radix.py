"""``KVTCRadixCache``: SGLang's ``RadixCache`` whose cold nodes are transform-coded in place.

A node is *device* (``node.value`` holds KV-pool slots, as in SGLang), *encoded* (slots and a kept blob) or
*compressed* (``node.value is None``; its blob is in :class:`~kvtc_sglang.cache.store.BlobStore` or, with a
host tier, in host memory: :class:`~kvtc_sglang.cache.placement.BlobPlacement` decides where and moves it). The
cache is thin: it implements SGLang's protocol and holds its parts, each with one owner of its state:
:class:`~kvtc_sglang.cache.surgery.TreeSurgery` (match, paths, splits, restores, an insert's adoption, slots
given and taken), :class:`~kvtc_sglang.cache.eviction.TreeEviction` (device leaves, subtrees and blobs dropped),
:class:`~kvtc_sglang.cache.compression.CompressionPlanner` (what to encode, commits, encoded nodes freed) and
:class:`~kvtc_sglang.cache.guards.NodeGuards` (nodes being restored or read by the encoder). The
:class:`~kvtc_sglang.cache.controller.KVTCController` runs every codec call (the background encoder, restores,
streams and fences), the :class:`~kvtc_sglang.cache.transcode.Transcoder` keeps the books, and the
:class:`~kvtc_sglang.cache.policy.CompressionPolicy` orders the work. How it meets SGLang's scheduler:

- ``match_prefix`` changes nothing but recency (and splits device nodes, as SGLang's does): compressed
  tokens on the matched path are reported as ``host_hit_length`` with ``best_match_node``; SGLang budgets
  them and, only for a request it admits, calls ``init_load_back``, which restores all of them or none, with
  one codec call for every compressed node of the request.
- ``insert`` (it runs inside the allocator's deferred-free groups) neither allocates nor encodes: a
  compressed node on the inserted path takes the inserting request's own exact KV slots.
- ``scheduler_tick`` (once per scheduler loop, outside free groups) commits finished background encodes and
  queues the next one while less than ``1 - idle_watermark`` of the pool could be freed at once;
  ``evict`` frees encoded nodes first, and encodes (bounded, on the scheduler thread) only when the
  encoder fell behind and cold KV would be dropped otherwise.
- ``evictable_size`` = unlocked device tokens + the store's borrowed slots (with ``protect_wanted``, the
  default, less the slots of *wanted* blobs, :mod:`~kvtc_sglang.cache.wanted`: compressed, matched or touched
  lately, unless nothing has run for a few passes or a request has waited ``STARVE_TICKS`` passes);
  ``protected_size`` = locked device tokens + those wanted slots;
  with the allocator's free slots they add up to the pool.
- Invariants: a compressed node and its subtree are unlocked; sinks and each leaf path's last
  ``window_tokens`` are never compressed; rows the encoder reads are not freed before it is done.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    DecLockRefParams,
    DecLockRefResult,
    EvictParams,
    EvictResult,
    InitLoadBackParams,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode
from sglang.srt.utils.rank_consensus_checker import rank_consensus

from ..codec import KVTCCodec, RawCodec
from .compression import CompressionPlanner
from .config import KVTCCacheConfig, resolve_encode_mode
from .controller import CudaStreamOps, KVTCController
from .evict_steps import EvictSteps
from .eviction import TreeEviction
from .governor import WINDOW_POOLS, EncodeGovernor
from .guards import NodeGuards, TickClock
from .joint import JointBook
from .kv_io import PoolKV
from .placement import BlobPlacement
from .policy import CompressionPolicy
from .ranks import LocalAgreement
from .report import KVTCReporter
from .restore import PathRestorer
from .stats import KVTCStats
from .store import BlobStore
from .surgery import TreeSurgery
from .transcode import Transcoder
from .tree_walk import device_values
from .wanted import WantedBlobs


class KVTCRadixCache(RadixCache):
    """Radix cache with KVTC-compressed cold nodes.

    Args:
        params: SGLang's cache parameters (allocator over an ``MHATokenToKVPool``).
        codec: the codec for the served model's calibration.
        config: sink/window/idle/store options.
        stream_ops: the controller's stream API (tests pass a recording stand-in; default: CUDA streams for a
            pool on a GPU, none on the CPU).
        agreement: the tensor-parallel ranks' agreement (:mod:`~kvtc_sglang.cache.ranks`); ``None``: one rank.
    """

    def __init__(
        self,
        params: CacheInitParams,
        codec: KVTCCodec | RawCodec,
        config: KVTCCacheConfig,
        stream_ops: CudaStreamOps | None = None,
        agreement: LocalAgreement | None = None,
    ) -> None:
        if params.is_eagle:
            raise ValueError("kvtc does not support EAGLE speculative decoding (bigram radix keys)")
        allocator = params.token_to_kv_pool_allocator
        spec = codec.spec
        kv = PoolKV(allocator.get_kvcache(), spec.num_layers, spec.num_kv_heads, spec.head_dim)
        if str(kv.dtype).removeprefix("torch.") != spec.dtype:
            raise ValueError(f"KV pool dtype is {kv.dtype}, calibration is for {spec.dtype}")
        ps = params.page_size
        self.config = config
        self.codec = codec
        self.stats = KVTCStats()
        self.store_max_tokens = max(ps, int(allocator.size * config.store_fraction) // ps * ps)
        self.store = BlobStore(kv.buffers, allocator, ps, self.store_max_tokens)
        self.policy = CompressionPolicy(config, ps)
        self.encode_mode = resolve_encode_mode(config.encode, kv.device.type)  # auto: by the pool's device
        self.ctl = KVTCController(
            codec, kv, self.stats, background=self.encode_mode == "background", verify=config.verify_restores,
            stream_ops=stream_ops, agreement=agreement,
        )
        self.placement = BlobPlacement(self.store, self.ctl.fences, self.stats, config.host_bytes)
        self.io = Transcoder(kv, self.placement, self.stats, self.policy)
        self.placement.attach(self.io, self.policy)
        self.wanted = WantedBlobs(config.protect_wanted)  # blobs admission may not take (opt-in)
        self.governor = EncodeGovernor(WINDOW_POOLS * allocator.size, config.max_waste_share)  # pauses waste
        self.clock = TickClock()  # scheduler iterations seen (the policy's clock for "recently under pressure")
        self.guards = NodeGuards(self.ctl, self.stats)  # nodes being restored, read by the encoder, spilled
        # the parts, each the one owner of its state (the module docstring); each reads the tree's SGLang fields
        guards, io, policy, store, ctl, placement, stats = (
            self.guards, self.io, self.policy, self.store, self.ctl, self.placement, self.stats)  # fmt: skip
        self.surgery = TreeSurgery(self, guards=guards, io=io, policy=policy, stats=stats)
        self.eviction = TreeEviction(self, guards=guards, io=io, placement=placement, policy=policy, store=store,
                                     ctl=ctl)  # fmt: skip
        self.restorer = PathRestorer(self, guards=guards, surgery=self.surgery, eviction=self.eviction, io=io,
                                     placement=placement, store=store, ctl=ctl, stats=stats, wanted=self.wanted)
        self.planner = CompressionPlanner(self, config=config, clock=self.clock, guards=guards, surgery=self.surgery,
                                          eviction=self.eviction, io=io, placement=placement, policy=policy,
                                          store=store, ctl=ctl, stats=stats, wanted=self.wanted,
                                          governor=self.governor)  # fmt: skip
        self.evict_steps = EvictSteps(self, planner=self.planner, eviction=self.eviction, policy=policy, ctl=ctl,
                                      stats=stats, clock=self.clock)  # fmt: skip
        self.stream_bound = False  # the plugin binds SGLang's forward stream at the first scheduler tick
        self.reporter = KVTCReporter()
        self._l3: Any = None
        super().__init__(params)  # calls reset()

    @property
    def l3(self) -> Any:
        """The L3 tier (:mod:`~kvtc_sglang.cache.l3_tier`) or ``None``; the factory attaches it."""
        return self._l3

    @l3.setter
    def l3(self, tier: Any) -> None:
        self._l3 = self.eviction.l3 = self.planner.l3 = tier  # write-back at drops; chunk cuts, write-through

    def enable_joint(self, codec: Any, seen_tokens: int | None = None) -> None:
        """Joint encoding across requests (:mod:`~kvtc_sglang.cache.joint`) with ``codec`` (a ``JointCodec``);
        the index remembers ``seen_tokens`` tokens of plain blobs (default: four pools' worth)."""
        size = self.token_to_kv_pool_allocator.size
        book = JointBook(fetch=self.placement.fetch, free=self.placement.free, stats=self.stats,
                         page_size=self.page_size, min_tokens=self.config.joint_min_tokens,
                         seen_tokens=seen_tokens or 4 * size)  # fmt: skip
        self.ctl.joint = codec
        self.io.joint = self.planner.joint = book

    # ----- the parts' methods tests call on the cache: one-line delegations to their owners -----
    _pending = property(lambda self: self.guards.pending)  # nodes whose rows the encoder reads, and its job
    _match = property(lambda self: self.surgery.match)
    _path_to = property(lambda self: self.surgery.path_to)
    _free_encoded = property(lambda self: self.planner.free_encoded)
    _shrink_store = property(lambda self: self.eviction.shrink_store)
    _evict_device_pass = property(lambda self: self.eviction.evict_device_pass)
    _wanted_slots = property(lambda self: self.wanted_slots)

    def compress_idle(self, now: float | None = None) -> int:
        """Compress every eligible node idle for ``idle_seconds`` at ``now`` (tools, tests: see the planner)."""
        return self.planner.compress_idle(now)

    # ----- accounting -----

    def reset(self) -> None:
        self.ctl.drain()  # the encoder's rows are about to be reused: wait, and forget its results
        self.guards.clear()
        self.wanted.clear()
        self.governor.clear()
        self.clock.calm()  # an empty cache is under no pressure: the encoder sleeps
        self.io.clear()  # gives the store's pages back (SGLang clears the allocator right after)
        super().reset()

    def wanted_slots(self) -> int:
        """Store slots of wanted blobs (:mod:`~kvtc_sglang.cache.wanted`), protected rather than evictable
        with ``protect_wanted`` (else 0)."""
        return self.wanted.slots(self.io.entries, self.store)

    def evictable_size(self) -> int:
        """Unlocked device tokens plus the store's borrowed slots (dropping blobs gives those back), less the
        slots of wanted blobs (:meth:`wanted_slots`)."""
        return self.evictable_size_ + self.store.num_slots - self.wanted_slots()

    def protected_size(self) -> int:
        """Locked device tokens (compressed nodes are never locked) and the wanted blobs' store slots."""
        return self.protected_size_ + self.wanted_slots()

    def compressed_size(self) -> int:
        """Tokens held only compressed."""
        return self.stats.resident_tokens

    def total_size(self) -> int:
        """Device tokens in the tree (compressed nodes hold none)."""
        return sum(len(v) for v in device_values(self.root_node))

    def all_values_flatten(self) -> torch.Tensor:
        vals = device_values(self.root_node)
        return torch.cat(vals) if vals else self._empty_device_indices

    def available_and_evictable_str(self) -> str:
        return f"{super().available_and_evictable_str()} {self.stats.summary()}"

    # ----- SGLang's protocol -----

    # SGLang's rank-consensus checker (SGLANG_ENABLE_RANK_CONSENSUS_CHECKER=1) on the tree decisions; not on
    # evictable_size, which SGLang's rank 0 also calls alone (its logs and metrics).
    @rank_consensus(same_params=["len(params.key)"], same_results=["result.device_prefix_len",
                                                                    "result.host_hit_length"])
    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        key = params.key
        if self.disable or len(key) == 0:
            return self._empty_match_result
        key = key.page_aligned(self.page_size)
        if len(key) == 0:
            return self._empty_match_result
        device_len, last_device, host_len, best = self.surgery.match(key)
        if host_len:
            self.wanted.mark_path(best, self.clock.ticks, self.io.entries)
        if params.req is not None and self.wanted.waiting(params.req.rid, self.clock.ticks):
            self.stats.starving_passes += 1  # a request SGLang tries to admit (or ranks) waited too long
        return MatchResult(device_prefix_len=device_len, last_device_node=last_device, last_host_node=last_device,
                           best_match_node=best, host_hit_length=host_len)  # fmt: skip

    def touch_prefix(self, key: RadixKey) -> None:
        if self.disable or len(key) == 0:
            return
        key = key.page_aligned(self.page_size)
        if len(key):
            _, _, host_len, best = self.surgery.match(key, split=False)
            if host_len:  # SGLang refreshes waiting requests' prefixes here (FCFS, every 32 passes)
                self.wanted.mark_path(best, self.clock.ticks, self.io.entries)

    @rank_consensus(same_params=["params.host_hit_length"], same_results=["result[0]"])
    def init_load_back(self, params: InitLoadBackParams) -> tuple[int, TreeNode] | None:
        """Restore the compressed part of a matched path for an admitted request: all promised tokens or none.

        Returns ``(host_hit_length, node ending the promised prefix)``, or ``(0, the device node the match
        ended on)`` when anything fails (no memory, a damaged blob, the path changed): the request then
        recomputes. Never ``None``: retrying could not succeed where this failed, and would stall admission.
        Restored slots belong to the tree (``load_back_is_cache_owned``)."""
        return self.restorer.load_back(params.host_hit_length, params.best_match_node, params.req)

    def load_back_is_cache_owned(self) -> bool:
        return True

    @rank_consensus(same_params=["len(params.key)"], same_results=["result.prefix_len"])
    def insert(self, params: InsertParams) -> InsertResult:
        """SGLang's insert; compressed nodes on the path first take the request's own slots (no allocation).

        ``prefix_len`` then ends where the first compressed node began: SGLang frees the request's slots
        below it as duplicates and leaves the rest, which the tree now owns."""
        if self.disable:
            return super().insert(params)
        if params.value is None:
            raise ValueError("KVTCRadixCache.insert needs the KV slot indices (params.value), got None")
        first = None
        if self.io.entries:
            key = params.key.page_aligned(self.page_size)
            first = self.surgery.adopt_insert_path(key, params.value[: len(key)])
        result = super().insert(params)
        self.policy.touch_path(result.last_device_node)  # new nodes, and longer spans above them
        if first is not None and result.prefix_len > first:
            result = replace(result, prefix_len=first)
        return result

    def _split_node(self, key: RadixKey, child: TreeNode, split_len: int) -> TreeNode:
        """SGLang's split (its match and insert call it too; so do the parts), with kvtc's books kept."""
        self.surgery.before_split(child)
        head = super()._split_node(key, child, split_len)
        self.surgery.after_split(child, head)
        return head

    def dec_lock_ref(self, node: TreeNode, params: DecLockRefParams | None = None) -> DecLockRefResult:
        result = super().dec_lock_ref(node, params)
        self.guards.unlocked_path(node)
        self.policy.touch_path(node)  # nodes it unlocked may be encoded now (this path only)
        return result

    @rank_consensus(same_params=["params.num_tokens"], same_results=["result.num_tokens_evicted"])
    def evict(self, params: EvictParams) -> EvictResult:
        """Free ``params.num_tokens`` slots in the policy's order (encoded nodes first, drop blobs last:
        :mod:`~kvtc_sglang.cache.evict_steps`).

        Encodes only when nothing encoded is left and cold device KV would be dropped (``encode_inline``,
        bounded); only when every step together falls short and the background encoder holds nodes does it
        wait for that encoder (counted in ``encoder_waits``) and go through the steps once more."""
        if self.disable:
            return EvictResult()
        start = time.perf_counter()
        freed = self.evict_steps.free(params.num_tokens)
        self.update_eviction_metrics(freed, start)
        return EvictResult(num_tokens_evicted=freed)

    def scheduler_tick(self, waiting: list | None = None) -> None:
        """Once per scheduler loop iteration, outside free groups: commit finished background encodes, queue
        the next one, graft finished L3 prefetches and park new requests of SGLang's ``waiting`` queue for
        theirs (:mod:`~kvtc_sglang.cache.l3_tier`), report the counters."""
        if self.disable:
            return
        self.clock.ticks += 1
        if self.l3 is not None:
            self.l3.tick(waiting)
            vars(self.stats).update(self.l3.counters())
        self.wanted.on_tick(self.clock.ticks, self.protected_size_ > 0, self.io.entries)
        self.governor.on_tick(self.stats, busy=self.protected_size_ > 0)
        self.planner.commit(self.ctl.take_ready())
        self.planner.plan_background()
        if not self.ctl.background:
            self.planner.commit(self.ctl.take_ready())
        self.reporter.tick(self.stats.as_dict(), self.store.capacity_bytes)

    def bind_forward_stream(self, stream: object) -> None:
        """SGLang's forward stream (overlap scheduler), or ``None`` for the scheduler's own stream: every
        pool-row access of the codec waits on it (see :mod:`~kvtc_sglang.cache.controller`)."""
        self.ctl.bind_forward_stream(stream)
        self.stream_bound = True
