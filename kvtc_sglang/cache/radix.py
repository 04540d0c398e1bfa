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

import heapq
import logging
import time
from dataclasses import dataclass

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

from ..codec import BlobError, KVTCCodec
from ..codec.errors import BlobChecksumError
from .arena import BlobArena, BlobHandle
from .config import KVTCCacheConfig
from .kv_io import PoolKV
from .stats import KVTCStats
from .tree_walk import compress_candidates, subtree_postorder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressedNode:
    """Book-keeping of one compressed node: its blob and the absolute positions it covers."""

    handle: BlobHandle
    start: int  # depth of the node's first token = its RoPE position
    num_tokens: int
    raw_bytes: int


class KVTCRadixCache(RadixCache):
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
        self._ensure_arena()
        self.maybe_compress_idle()
        if self.compressed and params.value is not None:
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
        node, offset = self.root_node, 0
        self._protect.update(self._key_path(key))
        try:
            while offset < len(key):
                child = node.children.get(key.child_key_at(offset, self.page_size))
                if child is None:
                    break
                m = child.key.match_at(key, offset, page_size=self.page_size)
                if child in self.compressed:
                    whole = m == len(child.key)
                    ok = self._revive(child, source=value[offset : offset + m] if whole else None)
                    if not ok:
                        if child in self.compressed:
                            self._drop_subtree(child)
                        break
                if m < len(child.key):
                    break
                offset += m
                node = child
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
        freed = 0
        for cand, start, lo, hi in cands:
            if need is not None and freed >= need:
                break
            if cand.parent is None or cand.value is None or cand.lock_ref > 0 or cand in self._protect:
                continue  # changed since the candidates were listed
            if now is not None and now - cand.last_access_time < cfg.idle_seconds:
                continue
            if lo > start:
                self._split_node(cand.key, cand, lo - start)  # cand keeps [lo, end)
            target = cand
            if hi < lo + len(cand.key):
                target = self._split_node(cand.key, cand, hi - lo)  # the new parent covers [lo, hi)
            freed += self._compress(target, lo)
        return freed

    def _compress(self, node: TreeNode, start: int) -> int:
        t0 = time.perf_counter()
        slots = node.value
        num_t = len(slots)
        k, v = self.kv.gather(slots)  # [L, T, H, D] each
        blob = self.codec.encode(k, v, torch.arange(start, start + num_t))
        handle = self.arena.put(blob)
        if handle is None:
            self._evict_compressed(blob.numel(), keep=node)
            handle = self.arena.put(blob)
            if handle is None:
                self.stats.store_full += 1
                return 0
        self.token_to_kv_pool_allocator.free(slots)
        node.value = None
        self.evictable_size_ -= num_t
        raw = 2 * k.numel() * k.element_size()
        self.compressed[node] = CompressedNode(handle, start, num_t, raw)
        s = self.stats
        s.compressions += 1
        s.compressed_tokens += num_t
        s.resident_nodes += 1
        s.resident_tokens += num_t
        s.resident_raw_bytes += raw
        s.resident_blob_bytes += handle.nbytes
        s.compress_seconds += time.perf_counter() - t0
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)
        return num_t

    def _forget(self, node: TreeNode) -> CompressedNode:
        entry = self.compressed.pop(node)
        self.arena.free(entry.handle)
        s = self.stats
        s.resident_nodes -= 1
        s.resident_tokens -= entry.num_tokens
        s.resident_raw_bytes -= entry.raw_bytes
        s.resident_blob_bytes -= entry.handle.nbytes
        return entry

    def _revive(self, node: TreeNode, source: torch.Tensor | None) -> bool:
        """Give compressed ``node`` device slots again: copied from ``source`` slots, or decoded."""
        t0 = time.perf_counter()
        entry = self.compressed[node]
        slots = self._alloc_slots(entry.num_tokens, keep=node)
        if slots is None:
            self.stats.restore_no_memory += 1
            return False
        if source is not None:
            self.kv.copy(source, slots)
            self.stats.adopted_tokens += entry.num_tokens
        else:
            try:
                k, v, pos = self.codec.decode(self.arena.get(entry.handle))
                want = torch.arange(entry.start, entry.start + entry.num_tokens)
                if not torch.equal(pos.cpu(), want):
                    raise BlobChecksumError(f"blob positions {pos[:1].tolist()}.. differ from node's {entry.start}..")
            except BlobError as e:
                logger.warning("kvtc: dropping a compressed node of %d tokens: %s", entry.num_tokens, e)
                self.token_to_kv_pool_allocator.free(slots)
                self.stats.checksum_failures += 1
                self._drop_subtree(node)
                return False
            self.kv.scatter(slots, k, v)
            self.stats.restores += 1
            self.stats.restored_tokens += entry.num_tokens
        self._forget(node)
        node.value = slots
        self.evictable_size_ += entry.num_tokens
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)
        self.stats.restore_seconds += time.perf_counter() - t0
        return True

    def _alloc_slots(self, num_tokens: int, keep: TreeNode) -> torch.Tensor | None:
        allocator = self.token_to_kv_pool_allocator
        short = num_tokens - allocator.available_size()
        if short > 0:
            if short > self.evictable_size_:
                return None  # even evicting every unlocked device token would not do: touch nothing
            self._protect.add(keep)
            self.evict(EvictParams(num_tokens=short))
        return allocator.alloc(num_tokens) if allocator.available_size() >= num_tokens else None

    # ----- eviction -----

    def _evict_compressed(self, nbytes: int, keep: TreeNode) -> None:
        """Drop compressed nodes (leaves first, then least recently used) until ``nbytes`` fit the arena."""
        order = sorted(
            (n for n in self.compressed if n is not keep and n not in self._protect),
            key=lambda n: (len(n.children) > 0, n.last_access_time),
        )
        for node in order:
            if self.arena.can_fit(nbytes):
                return
            if node in self.compressed and node.parent is not None:
                self._drop_subtree(node)

    def _evict_device(self, need: int) -> int:
        """SGLang's LRU leaf eviction over device nodes; a leaf's compressed children go with it.

        A device leaf whose compressed children still hold device nodes further down waits until those
        are gone (deeper, more specific KV goes first)."""
        prio = self.eviction_strategy.get_priority
        heap = [(prio(n), id(n), n) for n in self.evictable_leaves]
        heapq.heapify(heap)
        freed = 0
        while freed < need and heap:
            _, _, victim = heapq.heappop(heap)
            if victim not in self.evictable_leaves or victim in self._protect or _has_device_below(victim):
                continue
            up = victim.parent
            freed += self._drop_subtree(victim)
            while up is not None and up is not self.root_node and up.value is None:
                up = up.parent  # the nearest device ancestor may have become a leaf
            if up is not None and up in self.evictable_leaves:
                heapq.heappush(heap, (prio(up), id(up), up))
        return freed

    def _drop_subtree(self, node: TreeNode) -> int:
        """Remove ``node`` and everything under it from the tree; returns the device slots freed."""
        freed = 0
        for n, _ in subtree_postorder(node):
            if n.lock_ref > 0:
                raise RuntimeError(f"kvtc invariant broken: dropping a locked node (lock_ref={n.lock_ref})")
            if n in self.compressed:
                entry = self._forget(n)
                self.stats.dropped_nodes += 1
                self.stats.dropped_tokens += entry.num_tokens
            elif n.value is not None:
                self.token_to_kv_pool_allocator.free(n.value)
                self.evictable_size_ -= len(n.value)
                freed += len(n.value)
                self.evictable_leaves.discard(n)
                self.kv_events.record_remove(n)
                n.value = None
        parent = node.parent
        parent.children.pop(node.key.child_key(self.page_size))
        node.parent = None
        self._update_leaf_status(parent)
        return freed


def _has_device_below(node: TreeNode) -> bool:
    return any(n is not node and n.value is not None for n, _ in subtree_postorder(node))
