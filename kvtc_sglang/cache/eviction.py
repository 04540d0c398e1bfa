"""Dropping KV for :class:`~kvtc_sglang.cache.radix.KVTCRadixCache` (base of its tree surgery): device
leaves as SGLang's LRU eviction does, blobs when the store must shrink or make room. Nodes in ``_protect``
are never touched; every node that leaves the tree emits SGLang's removal event."""

from __future__ import annotations

import heapq

from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from .tree_walk import subtree_postorder


class TreeEviction(RadixCache):
    def _make_store_room(self, pages: int, keep: TreeNode) -> None:
        """Drop blobs (the policy's order) until the store can borrow ``pages`` more pages within its cap.

        ``keep`` and its ancestors are spared: dropping an ancestor would drop ``keep`` with it."""
        spared = set(self._protect)
        while keep is not None:
            spared.add(keep)
            keep = keep.parent
        store = self.store
        target = store.max_pages - pages
        for node, kept in self.policy.store_victims(self.io.retained, self.io.entries, spared):
            if store.num_pages <= target:
                return
            if kept:
                self.io.drop_retained(node)
            elif node in self.io.entries and node.parent is not None:
                self._drop_subtree(node)

    def _shrink_store(self, need: int) -> int:
        """Drop blobs until the store has given ``need`` slots back to the pool (or none are left)."""
        store = self.store
        before, freed = store.num_slots, 0
        for node, kept in self.policy.store_victims(self.io.retained, self.io.entries, set(self._protect)):
            if before - store.num_slots + freed >= need:
                break
            if kept:
                self.io.drop_retained(node)
            elif node in self.io.entries and node.parent is not None:
                freed += self._drop_subtree(node)
        return before - store.num_slots + freed

    def _evict_device_pass(self, need: int, keep_compressed: bool) -> int:
        """SGLang's LRU leaf eviction over device nodes.

        With ``keep_compressed`` only leaves with nothing compressed under them; else also leaves whose
        compressed children go with them (evicting a 4-token sink would otherwise throw away every
        compressed conversation under it). A leaf whose compressed children still hold device nodes
        further down waits until those are gone (deeper, more specific KV goes first)."""
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
        self.policy.tree_version += 1
        self.policy.drops += 1
        freed = 0
        for n, _ in subtree_postorder(node):
            if n.lock_ref > 0:
                raise RuntimeError(f"kvtc invariant broken: dropping a locked node (lock_ref={n.lock_ref})")
            self.kv_events.record_remove(n)  # children first, while the parent links still stand
            if n in self.io.entries:
                entry = self.io.pop(n)
                self.store.free(entry.handle)
                self.stats.dropped_nodes += 1
                self.stats.dropped_tokens += entry.node_tokens
            elif n.value is not None:
                self.io.drop_retained(n)
                self.token_to_kv_pool_allocator.free(n.value)
                self.evictable_size_ -= len(n.value)
                freed += len(n.value)
                self.evictable_leaves.discard(n)
                n.value = None
        parent = node.parent
        parent.children.pop(node.key.child_key(self.page_size))
        node.parent = None
        self._update_leaf_status(parent)
        return freed


def _has_device_below(node: TreeNode) -> bool:
    return any(n is not node and n.value is not None for n, _ in subtree_postorder(node))
