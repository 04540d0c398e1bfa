"""Dropping KV from the tree of :class:`~kvtc_sglang.cache.radix.KVTCRadixCache` (the cache holds one
:class:`TreeEviction`): device leaves as SGLang's LRU eviction does, blobs when the store must shrink or make room.

Nodes the :class:`~kvtc_sglang.cache.guards.NodeGuards` protect (being restored) are never touched; every node that
leaves the tree goes through :meth:`TreeEviction.drop_subtree`, which emits SGLang's removal event and keeps
SGLang's ``evictable_size_`` and ``evictable_leaves`` as ``RadixCache`` keeps them. A node whose rows the
background encoder still reads is passed over, or, when it must go, waited for first."""

from __future__ import annotations

import heapq
from typing import Any

from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from .controller import KVTCController
from .guards import NodeGuards
from .placement import BlobPlacement
from .policy import CompressionPolicy
from .store import BlobStore
from .transcode import Transcoder
from .tree_walk import subtree_postorder


class TreeEviction:
    """Drops device leaves, subtrees and blobs of ``tree``.

    Args:
        tree: the SGLang radix tree (its ``root_node``, allocator, ``evictable_size_``, ``evictable_leaves``,
            ``eviction_strategy``, ``kv_events`` and leaf bookkeeping are used).
        guards: the nodes not to touch now.
        io: the blob books; ``placement`` moves a dropped blob to host memory where it can.
        policy: the order of drops; ``store`` the blob store; ``ctl`` the controller (its decision digest).
    """

    def __init__(self, tree: RadixCache, *, guards: NodeGuards, io: Transcoder, placement: BlobPlacement,
                 policy: CompressionPolicy, store: BlobStore, ctl: KVTCController) -> None:  # fmt: skip
        self.tree = tree
        self.guards = guards
        self.io = io
        self.placement = placement
        self.policy = policy
        self.store = store
        self.ctl = ctl
        self.l3: Any = None  # the L3 tier (:mod:`~kvtc_sglang.cache.l3_tier`): write-back before a drop

    # ----- blobs -----

    def holds(self, node: TreeNode, kept: bool) -> bool:
        """Holds that kind of blob (a compressed node's only in the store: those in host memory hold no pool)."""
        if kept:
            return node in self.io.retained
        entry = self.io.entries.get(node)
        return entry is not None and not entry.handle.on_host

    def drop_blob(self, node: TreeNode, kept: bool, spared: set[TreeNode] | None = None) -> int:
        """Drop a kept blob (no KV lost) or a compressed node with its subtree; returns device slots freed. A
        compressed node's blob moves to host memory instead when the placement can take it (the node stays);
        a kept blob already in host memory holds no store room and stays."""
        if kept:
            if self.io.retained[node].handle.on_host:
                return 0
            self.io.drop_retained(node)
            if node.lock_ref > 0:
                self.guards.spilled.add(node)  # not encoded again until its request ends (no encode/drop churn)
            return 0
        if self.placement.demote_node(node, spared or self.guards.protect, self.drop_subtree):
            return 0
        return self.drop_subtree(node)

    def make_store_room(self, pages: int, keep: TreeNode | None) -> None:
        """Drop blobs (the policy's order) until the store can borrow ``pages`` more pages within its cap.

        ``keep`` and its ancestors are spared: dropping an ancestor would drop ``keep`` with it."""
        spared = set(self.guards.protect)
        while keep is not None:
            spared.add(keep)
            keep = keep.parent
        store = self.store
        target = store.max_pages - pages

        def drop(node: TreeNode, kept: bool) -> bool:
            self.drop_blob(node, kept, spared)
            return store.num_pages <= target

        if store.num_pages > target:
            self.policy.offer_blobs(spared, self.holds, drop)

    def shrink_store(self, need: int, kept_only: bool = False) -> int:
        """Drop blobs until the store has given ``need`` slots back to the pool (or none are left); with
        ``kept_only`` only the kept blobs of device nodes (no KV is lost)."""
        store = self.store
        before, freed = store.num_slots, 0

        def drop(node: TreeNode, kept: bool) -> bool:
            nonlocal freed
            freed += self.drop_blob(node, kept)
            return before - store.num_slots + freed >= need

        self.policy.offer_blobs(set(self.guards.protect), self.holds, drop, kept_only=kept_only)
        return before - store.num_slots + freed

    # ----- device nodes -----

    def evict_device_pass(self, need: int, keep_compressed: bool) -> int:
        """SGLang's LRU leaf eviction over device nodes.

        With ``keep_compressed`` only leaves with nothing compressed under them; else also leaves whose
        compressed children go with them (evicting a 4-token sink would otherwise throw away every
        compressed conversation under it). A leaf whose compressed children still hold device nodes
        further down waits until those are gone (deeper, more specific KV goes first). Nodes being encoded
        are passed over (their rows are still read)."""
        tree, guards = self.tree, self.guards
        prio = tree.eviction_strategy.get_priority
        heap = [(prio(n), id(n), n) for n in tree.evictable_leaves]
        heapq.heapify(heap)
        freed = 0
        while freed < need and heap:
            _, _, victim = heapq.heappop(heap)
            if victim not in tree.evictable_leaves or victim in guards.protect or victim in guards.pending:
                continue
            if keep_compressed and victim.children:
                continue
            if not keep_compressed and self._busy_below(victim):
                continue
            up = victim.parent
            freed += self.drop_subtree(victim)
            while up is not None and up is not tree.root_node and up.value is None:
                up = up.parent  # the nearest device ancestor may have become a leaf
            if up is not None and up in tree.evictable_leaves:
                heapq.heappush(heap, (prio(up), id(up), up))
        return freed

    def _busy_below(self, node: TreeNode) -> bool:
        """A device node under ``node`` (it goes first), or one being encoded."""
        pending = self.guards.pending
        return any(n is not node and (n.value is not None or n in pending) for n, _ in subtree_postorder(node))

    def drop_subtree(self, node: TreeNode) -> int:
        """Remove ``node`` and everything under it from the tree; returns the device slots freed."""
        tree = self.tree
        parent = node.parent
        order = subtree_postorder(node)
        self.ctl.digest.mix("drop", len(order), len(node.key))
        if any(n in self.guards.pending for n, _ in order):
            self.guards.wait_pending()  # rows the encoder reads must not be freed under it (rare: passes skip these)
        if self.l3 is not None:
            self.l3.writer.dropping(node, order)  # write-back: the chunks of blobs about to be lost, copied out first
        freed = 0
        for n, _ in order:
            if n.lock_ref > 0:
                raise RuntimeError(f"kvtc invariant broken: dropping a locked node (lock_ref={n.lock_ref})")
            tree.kv_events.record_remove(n)  # children first, while the parent links still stand
            self.policy.candidates.discard(n)
            if n in self.io.entries:
                self.io.free_dropped(n)
            elif n.value is not None:
                self.io.drop_retained(n)
                tree.token_to_kv_pool_allocator.free_segment(n.value, start_pos=0)  # page-exact: no sync
                tree.evictable_size_ -= len(n.value)
                freed += len(n.value)
                tree.evictable_leaves.discard(n)
                n.value = None
        parent.children.pop(node.key.child_key(tree.page_size))
        node.parent = None
        tree._update_leaf_status(parent)  # SGLang's own bookkeeping of its leaves
        self.policy.touch_path(parent)  # the shallowest leaf below its ancestors may be deeper now
        return freed
