"""Eviction for :class:`~kvtc_sglang.cache.radix.KVTCRadixCache`: compressed store first, then device leaves.

A mixin over SGLang's ``RadixCache`` state (``evictable_leaves``, ``evictable_size_``, the allocator) and the
KVTC cache's (``compressed``, ``arena``, ``stats``, ``_protect``); nodes in ``_protect`` are never touched.
"""

from __future__ import annotations

import heapq

from .tree_walk import TreeNode, subtree_postorder


class EvictionMixin:
    def _evict_compressed(self, nbytes: int, keep: TreeNode) -> None:
        """Drop compressed nodes (leaves first, then least recently used) until ``nbytes`` fit the arena.

        ``keep`` and its ancestors are spared: dropping an ancestor would drop ``keep`` with it."""
        spared = set(self._protect)
        while keep is not None:
            spared.add(keep)
            keep = keep.parent
        order = sorted(
            (n for n in self.compressed if n not in spared),
            key=lambda n: (len(n.children) > 0, n.last_access_time),
        )
        for node in order:
            if self.arena.can_fit(nbytes):
                return
            if node in self.compressed and node.parent is not None:
                self._drop_subtree(node)

    def _evict_device(self, need: int) -> int:
        """SGLang's LRU leaf eviction over device nodes.

        Two passes: first only leaves with nothing compressed under them; then, if still short, leaves
        whose compressed children go with them (evicting a 4-token sink would otherwise throw away every
        compressed conversation under it). A leaf whose compressed children still hold device nodes
        further down waits until those are gone (deeper, more specific KV goes first)."""
        freed = self._evict_device_pass(need, keep_compressed=True)
        if freed < need:
            freed += self._evict_device_pass(need - freed, keep_compressed=False)
        return freed

    def _evict_device_pass(self, need: int, keep_compressed: bool) -> int:
        prio = self.eviction_strategy.get_priority
        heap = [(prio(n), id(n), n) for n in self.evictable_leaves]
        heapq.heapify(heap)
        freed = 0
        while freed < need and heap:
            _, _, victim = heapq.heappop(heap)
            if victim not in self.evictable_leaves or victim in self._protect or _has_device_below(victim):
                continue
            if keep_compressed and victim.children:
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
