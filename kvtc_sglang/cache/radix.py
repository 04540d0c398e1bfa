"""``KVTCRadixCache``: SGLang's ``RadixCache`` whose cold nodes are transform-coded in place.

A node is either *device* (``node.value`` holds KV-pool slot indices, as in SGLang) or *compressed*
(``node.value is None``; its blob lives in :class:`~kvtc_sglang.cache.arena.BlobArena`, which is carved out
of the KV pool). Invariants:

- a compressed node is unlocked, so is its whole subtree (locking walks to the root through device nodes);
- ``evictable_size_``/``protected_size_`` count device tokens only, as SGLang's scheduler expects;
- sinks (the first ``sink_tokens``) and each leaf path's last ``window_tokens`` are never compressed;
- ``match_prefix`` restores compressed nodes on the matched path into freshly allocated slots, so callers
  only ever see ordinary device indices; a restore that fails (no memory, bad blob) ends the match there.
"""

from __future__ import annotations

import logging
import time

import torch
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    EvictResult,
    InsertParams,
    InsertResult,
    MatchPrefixParams,
    MatchResult,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from ..codec import KVTCCodec
from .arena import BlobArena
from .config import KVTCCacheConfig
from .eviction import EvictionMixin
from .kv_io import PoolKV
from .report import KVTCReporter
from .stats import KVTCStats
from .transcode import CompressedNode, TranscodeMixin
from .tree_walk import compress_candidates, subtree_postorder

logger = logging.getLogger(__name__)


class KVTCRadixCache(TranscodeMixin, EvictionMixin, RadixCache):
    """Radix cache with KVTC-compressed cold nodes.

    Args:
        params: SGLang's cache parameters (allocator over an ``MHATokenToKVPool``).
        codec: the codec for the served model's calibration.
        config: sink/window/idle/store options.
    """

    def __init__(self, params: CacheInitParams, codec: KVTCCodec, config: KVTCCacheConfig) -> None:
        if params.is_eagle:
            raise ValueError("kvtc does not support EAGLE speculative decoding (bigram radix keys)")
        self.codec = codec
        self.config = config
        self.stats = KVTCStats()
        self.compressed: dict[TreeNode, CompressedNode] = {}
        self.arena: BlobArena | None = None
        self._protect: set[TreeNode] = set()
        self._last_idle_check = float("-inf")
        self.reporter = KVTCReporter()
        super().__init__(params)  # calls reset()
        allocator = self.token_to_kv_pool_allocator
        spec = codec.spec
        self.kv = PoolKV(allocator.get_kvcache(), spec.num_layers, spec.num_kv_heads, spec.head_dim)
        if str(self.kv.dtype).removeprefix("torch.") != spec.dtype:
            raise ValueError(f"KV pool dtype is {self.kv.dtype}, calibration is for {spec.dtype}")
        ps = self.page_size
        self.arena_tokens = max(ps, int(allocator.size * config.store_fraction) // ps * ps)
        self._ensure_arena()

    # ----- store and accounting -----

    def _ensure_arena(self) -> None:
        """(Re)reserve the arena's slots; after ``reset`` SGLang clears the allocator, so this is lazy."""
        if self.arena is not None or not hasattr(self, "kv"):
            return
        slots = self.token_to_kv_pool_allocator.alloc(self.arena_tokens)
        if slots is None:
            raise RuntimeError(
                f"cannot reserve {self.arena_tokens} KV slots for the compressed store: only "
                f"{self.token_to_kv_pool_allocator.available_size()} free"
            )
        self.arena = BlobArena(self.kv.buffers, slots)

    def reset(self) -> None:
        if self.arena is not None:
            self.token_to_kv_pool_allocator.free(self.arena.slots)
            self.arena = None
        self.compressed = {}
        self.stats.resident_nodes = self.stats.resident_tokens = 0
        self.stats.resident_raw_bytes = self.stats.resident_blob_bytes = 0
        super().reset()

    def protected_size(self) -> int:
        """Locked device tokens plus the slots reserved for the compressed store."""
        return self.protected_size_ + (self.arena.slots.numel() if self.arena is not None else 0)

    def compressed_size(self) -> int:
        """Tokens held compressed."""
        return self.stats.resident_tokens

    def _device_values(self) -> list[torch.Tensor]:
        nodes = subtree_postorder(self.root_node)
        return [n.value for n, _ in nodes if n is not self.root_node and n.value is not None]

    def total_size(self) -> int:
        """Device tokens in the tree (compressed nodes hold none)."""
        return sum(len(v) for v in self._device_values())

    def all_values_flatten(self) -> torch.Tensor:
        vals = self._device_values()
        return torch.cat(vals) if vals else self._empty_device_indices

    def scheduler_tick(self) -> None:
        """Once per scheduler loop iteration (plugin hook), outside the allocator's free groups."""
        capacity = self.arena.capacity_bytes if self.arena is not None else 0
        self.reporter.tick(self.stats.as_dict(), capacity)

    def available_and_evictable_str(self) -> str:
        return f"{super().available_and_evictable_str()} {self.stats.summary()}"

    # ----- public API -----

    def match_prefix(self, params: MatchPrefixParams) -> MatchResult:
        key = params.key
        if self.disable or len(key) == 0:
            return self._empty_match_result
        self._ensure_arena()
        key = key.page_aligned(self.page_size)
        if len(key) == 0:
            return self._empty_match_result
        values, last = self._walk(key, restore=True)
        return MatchResult(
            device_prefix_len=sum(len(v) for v in values),
            last_device_node=last,
            last_host_node=last,
            best_match_node=last,
        )

    def touch_prefix(self, key: RadixKey) -> None:
        if self.disable or len(key) == 0:
            return
        self._walk(key.page_aligned(self.page_size), restore=False)

    def insert(self, params: InsertParams) -> InsertResult:
        if self.disable:
            return super().insert(params)
        if params.value is None:
            raise ValueError("KVTCRadixCache.insert needs the KV slot indices (params.value), got None")
        self._ensure_arena()
        self.maybe_compress_idle()
        if self.compressed:
            key = params.key.page_aligned(self.page_size)
            self._revive_insert_path(key, params.value[: len(key)])
        return super().insert(params)

    def evict(self, params: EvictParams) -> EvictResult:
        """Free ``params.num_tokens`` slots: compress cold nodes first (LRU), evict only what is still short."""
        if self.disable:
            return EvictResult()
        self._ensure_arena()
        start = time.perf_counter()
        need = params.num_tokens
        freed = self._compress_cold(need, now=None)
        if freed < need:
            freed += self._evict_device(need - freed)
        self.update_eviction_metrics(freed, start)
        return EvictResult(num_tokens_evicted=freed)

    def maybe_compress_idle(self, now: float | None = None) -> int:
        """Compress nodes idle past ``idle_seconds``, at most every ``idle_seconds / 4``."""
        now = time.monotonic() if now is None else now
        if now - self._last_idle_check < max(0.05, self.config.idle_seconds / 4):
            return 0
        self._last_idle_check = now
        return self.compress_idle(now)

    def compress_idle(self, now: float | None = None) -> int:
        """Compress every eligible node untouched for ``idle_seconds``; returns the slots freed."""
        self._ensure_arena()
        return self._compress_cold(None, now=time.monotonic() if now is None else now)

    # ----- walking the tree -----

    def _walk(self, key: RadixKey, restore: bool) -> tuple[list[torch.Tensor], TreeNode]:
        """Match ``key`` from the root; with ``restore`` decode compressed nodes on the way (else stop)."""
        now = time.monotonic()
        node = self.root_node
        node.last_access_time = now
        values: list[torch.Tensor] = []
        if restore:
            self._protect.update(self._key_path(key))  # restoring must not evict what it is about to match
        try:
            while len(key) > 0:
                child = node.children.get(key.child_key(self.page_size))
                if child is None:
                    break
                if child in self.compressed:
                    if not restore:
                        break
                    if not self._revive(child, source=None):
                        break
                child.last_access_time = now
                prefix_len = child.key.match(key, page_size=self.page_size)
                if prefix_len < len(child.key):
                    if not restore:
                        break
                    node = self._split_node(child.key, child, prefix_len)
                    values.append(node.value)
                    break
                values.append(child.value)
                node = child
                key = key[prefix_len:]
        finally:
            self._protect.clear()
        return values, node

    def _key_path(self, key: RadixKey) -> list[TreeNode]:
        """Nodes ``key`` runs through (the root included), without touching the tree."""
        node, offset, path = self.root_node, 0, [self.root_node]
        while offset < len(key):
            child = node.children.get(key.child_key_at(offset, self.page_size))
            if child is None:
                break
            path.append(child)
            m = child.key.match_at(key, offset, page_size=self.page_size)
            if m < len(child.key):
                break
            offset += m
            node = child
        return path

    def _revive_insert_path(self, key: RadixKey, value: torch.Tensor) -> None:
        """Make compressed nodes on ``key``'s path device nodes before SGLang's insert walks it.

        A node the key covers whole takes a copy of the inserting request's fresh KV (exact, no decode);
        one it covers in part is decoded. If neither can get slots, the node and its subtree are dropped
        and the insert stores the request's KV in their place.
        """
        path = self._key_path(key)  # reviving keeps every node in place; a drop ends the walk
        self._protect.update(path)
        offset = 0
        try:
            for child in path[1:]:
                m = child.key.match_at(key, offset, page_size=self.page_size)
                if child in self.compressed:
                    whole = m == len(child.key)
                    ok = self._revive(child, source=value[offset : offset + m] if whole else None)
                    if not ok:
                        if child in self.compressed:
                            self._drop_subtree(child)
                        break
                offset += m
        finally:
            self._protect.clear()

    # ----- compress / restore -----

    def _compress_cold(self, need: int | None, now: float | None) -> int:
        """Compress eligible nodes, least recently used first; idle ones only when ``now`` is given."""
        cfg = self.config
        ps = self.page_size
        sink_end = -(-cfg.sink_tokens // ps) * ps
        min_tokens = max(ps, cfg.min_tokens // ps * ps)
        cands = compress_candidates(self.root_node, sink_end, cfg.window_tokens, ps, min_tokens)
        freed, i = 0, 0
        while i < len(cands) and (need is None or freed < need):
            # One batch: enough nodes for what is still needed (all of them for idle compression). A node
            # dropped while making store room for another frees no slots, so another batch may follow.
            targets: list[tuple[TreeNode, int]] = []
            planned = 0
            while i < len(cands) and (need is None or freed + planned < need):
                cand, start, lo, hi = cands[i]
                i += 1
                if cand.parent is None or cand.value is None or cand.lock_ref > 0 or cand in self._protect:
                    continue  # changed since the candidates were listed
                if now is not None and now - cand.last_access_time < cfg.idle_seconds:
                    continue
                if lo > start:
                    self._split_node(cand.key, cand, lo - start)  # cand keeps [lo, end)
                target = cand
                if hi < lo + len(cand.key):
                    target = self._split_node(cand.key, cand, hi - lo)  # the new parent covers [lo, hi)
                targets.append((target, lo))
                planned += len(target.value)
            if targets:
                freed += self._compress_many(targets)
        return freed
