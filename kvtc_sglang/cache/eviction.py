"""Dropping KV for :class:`~kvtc_sglang.cache.radix.KVTCRadixCache` (base of its tree surgery): device
leaves as SGLang's LRU eviction does, blobs when the store must shrink or make room. Nodes in ``_protect``
are never touched; every node that leaves the tree emits SGLang's removal event. A node whose rows the
background encoder still reads is passed over, or, when it must go, waited for first."""

from __future__ import annotations

import heapq

from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from .tree_walk import subtree_postorder


class TreeEviction(RadixCache):
    # ----- blobs -----

    def _holds(self, node: TreeNode, kept: bool) -> bool:
        """Holds that kind of blob (a compressed node's only in the store: those in host memory hold no pool)."""
        if kept:
            return node in self.io.retained
        entry = self.io.entries.get(node)
        return entry is not None and not entry.handle.on_host

    def _drop_blob(self, node: TreeNode, kept: bool, spared: set[TreeNode] | None = None) -> int:
        """Drop a kept blob (no KV lost) or a compressed node with its subtree; returns device slots freed. A
        compressed node's blob moves to host memory instead when the placement can take it (the node stays);
        a kept blob already in host memory holds no store room and stays."""
        if kept:
            if self.io.retained[node].handle.on_host:
                return 0
            self.io.drop_retained(node)
            if node.lock_ref > 0:
                self._spilled.add(node)  # not encoded again until its request ends (no encode/drop churn)
            return 0
        if self.placement.demote_node(node, spared or self._protect, self._drop_subtree):
            return 0
        return self._drop_subtree(node)

    def _make_store_room(self, pages: int, keep: TreeNode) -> None:
        """Drop blobs (the policy's order) until the store can borrow ``pages`` more pages within its cap.

        ``keep`` and its ancestors are spared: dropping an ancestor would drop ``keep`` with it."""
        spared = set(self._protect)
        while keep is not None:
            spared.add(keep)
            keep = keep.parent
        store = self.store
        target = store.max_pages - pages

        def drop(node: TreeNode, kept: bool) -> bool:
            self._drop_blob(node, kept, spared)
            return store.num_pages <= target

        if store.num_pages > target:
            self.policy.offer_blobs(spared, self._holds, drop)

    def _shrink_store(self, need: int, kept_only: bool = False) -> int:
        """Drop blobs until the store has given ``need`` slots back to the pool (or none are left); with
        ``kept_only`` only the kept blobs of device nodes (no KV is lost)."""
        store = self.store
        before, freed = store.num_slots, 0

        def drop(node: TreeNode, kept: bool) -> bool:
            nonlocal freed
            freed += self._drop_blob(node, kept)
            return before - store.num_slots + freed >= need

        self.policy.offer_blobs(set(self._protect), self._holds, drop, kept_only=kept_only)
        return before - store.num_slots + freed

    # ----- device nodes -----

    def _evict_device_pass(self, need: int, keep_compressed: bool) -> int:
        """SGLang's LRU leaf eviction over device nodes.

        With ``keep_compressed`` only leaves with nothing compressed under them; else also leaves whose
        compressed children go with them (evicting a 4-token sink would otherwise throw away every
        compressed conversation under it). A leaf whose compressed children still hold device nodes
        further down waits until those are gone (deeper, more specific KV goes first). Nodes being encoded
        are passed over (their rows are still read)."""
        prio = self.eviction_strategy.get_priority
        heap = [(prio(n), id(n), n) for n in self.evictable_leaves]
        heapq.heapify(heap)
        freed = 0
        while freed < need and heap:
            _, _, victim = heapq.heappop(heap)
            if victim not in self.evictable_leaves or victim in self._protect or victim in self._pending:
                continue
            if keep_compressed and victim.children:
                continue
            if not keep_compressed and self._busy_below(victim):
                continue
            up = victim.parent
            freed += self._drop_subtree(victim)
            while up is not None and up is not self.root_node and up.value is None:
                up = up.parent  # the nearest device ancestor may have become a leaf
            if up is not None and up in self.evictable_leaves:
                heapq.heappush(heap, (prio(up), id(up), up))
        return freed

    def _busy_below(self, node: TreeNode) -> bool:
        """A device node under ``node`` (it goes first), or one being encoded."""
        return any(n is not node and (n.value is not None or n in self._pending) for n, _ in subtree_postorder(node))

    def _drop_subtree(self, node: TreeNode) -> int:
        """Remove ``node`` and everything under it from the tree; returns the device slots freed."""
        parent = node.parent
        order = subtree_postorder(node)
        self.ctl.digest.mix("drop", len(order), len(node.key))
        if any(n in self._pending for n, _ in order):
            self._wait_pending()  # rows the encoder reads must not be freed under it (rare: passes skip these)
        if self.l3 is not None:
            self.l3.writer.dropping(node, order)  # write-back: the chunks of blobs about to be lost, copied out first
        freed = 0
        for n, _ in order:
            if n.lock_ref > 0:
                raise RuntimeError(f"kvtc invariant broken: dropping a locked node (lock_ref={n.lock_ref})")
            self.kv_events.record_remove(n)  # children first, while the parent links still stand
            self.policy.candidates.discard(n)
            if n in self.io.entries:
                self.io.free_dropped(n)
            elif n.value is not None:
                self.io.drop_retained(n)
                self.token_to_kv_pool_allocator.free_segment(n.value, start_pos=0)  # page-exact: no sync
                self.evictable_size_ -= len(n.value)
                freed += len(n.value)
                self.evictable_leaves.discard(n)
                n.value = None
        parent.children.pop(node.key.child_key(self.page_size))
        node.parent = None
        self._update_leaf_status(parent)
        self.policy.touch_path(parent)  # the shallowest leaf below its ancestors may be deeper now
        return freed
