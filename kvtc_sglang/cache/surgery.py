"""Tree surgery of :class:`~kvtc_sglang.cache.radix.KVTCRadixCache` (the cache holds one :class:`TreeSurgery`):
matching through compressed nodes, splitting nodes, adopting an insert's slots, and giving and taking a node's slots.

Every change of a node between device and compressed goes through the slot methods here (called by the
:class:`~kvtc_sglang.cache.restore.PathRestorer` and the :class:`~kvtc_sglang.cache.compression.CompressionPlanner`
too), with SGLang's ``evictable_size_``, ``evictable_leaves`` and KV events kept as ``RadixCache`` keeps them.
Splits of device nodes go through the tree's ``_split_node`` (SGLang's, which the cache extends with
:meth:`TreeSurgery.before_split` and :meth:`TreeSurgery.after_split`), so SGLang's own splits keep the books too."""

from __future__ import annotations

import time

import torch
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode
from sglang.srt.mem_cache.utils import split_node_hash_value

from .guards import NodeGuards
from .policy import CompressionPolicy
from .stats import KVTCStats
from .transcode import Transcoder


class TreeSurgery:
    """Walks and reshapes ``tree`` around its compressed nodes.

    Args:
        tree: the SGLang radix tree (its ``root_node``, ``page_size``, allocator, ``evictable_size_``,
            ``_split_node`` and leaf bookkeeping are used).
        guards: the nodes not to touch now.
        io, policy, stats: the blob books, the compression order (its candidates) and the counters.
    """

    def __init__(self, tree: RadixCache, *, guards: NodeGuards, io: Transcoder, policy: CompressionPolicy,
                 stats: KVTCStats) -> None:  # fmt: skip
        self.tree = tree
        self.guards = guards
        self.io = io
        self.policy = policy
        self.stats = stats

    # ----- walking -----

    def match(self, key: RadixKey, split: bool = True) -> tuple[int, TreeNode, int, TreeNode]:
        """``(device tokens, last device node, tokens after the first compressed node, deepest node)``.

        Nothing is restored; a match ending inside a device node splits it (as SGLang's does), one ending
        inside a compressed node counts its matched tokens (``init_load_back`` restores and then splits)."""
        tree, ps = self.tree, self.tree.page_size
        now = time.monotonic()
        node, offset = tree.root_node, 0
        node.last_access_time = now
        device_len, host_len, last_device, best, in_host = 0, 0, node, node, False
        while offset < len(key):
            child = node.children.get(key.child_key_at(offset, ps))
            if child is None:
                break
            m = child.key.match_at(key, offset, page_size=ps)
            child.last_access_time = now
            in_host = in_host or child in self.io.entries
            if m < len(child.key):
                if not split:
                    break
                if child not in self.io.entries:
                    child = tree._split_node(child.key, child, m)
            if in_host:
                host_len, best = host_len + m, child
            else:
                device_len, last_device, best = device_len + m, child, child
            if m < len(child.key):
                break
            node, offset = child, offset + m
        return device_len, last_device, host_len, best

    def path_to(self, node: TreeNode | None) -> list[TreeNode]:
        """Nodes from the root's child down to ``node``; empty if ``node`` is the root or was detached."""
        root, path = self.tree.root_node, []
        while node is not None and node is not root:
            path.append(node)
            node = node.parent
        return path[::-1] if node is root else []

    # ----- splits (the cache's ``_split_node`` calls these around SGLang's) -----

    def before_split(self, child: TreeNode) -> None:
        if child in self.io.entries:
            raise RuntimeError("kvtc invariant broken: SGLang's split reached a compressed node")
        self.io.drop_retained(child)  # its blob covers the whole node

    def after_split(self, child: TreeNode, head: TreeNode) -> None:
        self.guards.split(child, head)
        self.policy.candidates.add(head)
        self.policy.candidates.add(child)

    # ----- device <-> compressed -----

    def free_slots(self, slots: torch.Tensor) -> None:
        """Give tree-owned slots back: page-aligned runs of a KV row, so SGLang's sync-free segment free."""
        self.tree.token_to_kv_pool_allocator.free_segment(slots, start_pos=0)

    def release_slots(self, node: TreeNode) -> int:
        """A device node gives its slots back (it becomes compressed); returns how many."""
        tree = self.tree
        n = len(node.value)
        self.free_slots(node.value)
        node.value = None
        tree.evictable_size_ -= n
        self.policy.candidates.discard(node)
        tree._update_leaf_status(node)  # SGLang's own bookkeeping of its leaves
        tree._update_leaf_status(node.parent)
        return n

    def give_slots(self, node: TreeNode, slots: torch.Tensor) -> None:
        """A slot-less node (compressed, or just split off one) becomes a device node on ``slots``."""
        tree = self.tree
        node.value = slots.clone()
        tree.evictable_size_ += len(slots)
        tree._update_leaf_status(node)
        tree._update_leaf_status(node.parent)
        self.policy.candidates.add(node)

    # ----- insert -----

    def adopt_insert_path(self, key: RadixKey, value: torch.Tensor) -> int | None:
        """From the first compressed node on ``key``'s path on, the tree takes the request's own slots
        ``value`` (``[len(key)]`` int64): compressed nodes become device nodes on them (an exact copy of
        what they encode; the blob is kept), device nodes below give their own slots back. Returns the
        depth of the first compressed node, ``None`` if the path has none. Nothing is allocated."""
        ps = self.tree.page_size
        node, offset, first = self.tree.root_node, 0, None
        while offset < len(key):
            child = node.children.get(key.child_key_at(offset, ps))
            if child is None:
                break
            m = child.key.match_at(key, offset, page_size=ps)
            if first is None and child not in self.io.entries:
                if m < len(child.key):
                    break
                node, offset = child, offset + m
                continue
            if first is None:
                first = offset
            partial = m < len(child.key)
            if partial:
                child = self.split_head(child, m)
            self._take_request_slots(child, value[offset : offset + m])
            if partial:
                break
            node, offset = child, offset + m
        return first

    def split_head(self, child: TreeNode, m: int) -> TreeNode:
        """Split ``child`` after ``m`` tokens; returns the head. A compressed child keeps its blob for the
        tail (``skip``); the head has no slots yet."""
        ps = self.tree.page_size
        if child not in self.io.entries:
            return self.tree._split_node(child.key, child, m)
        head = TreeNode(priority=child.priority)
        head.hit_count = child.hit_count
        head.parent, head.key, head.value = child.parent, child.key[:m], None
        head.children = {child.key[m:].child_key(ps): child}
        head.parent.children[child.key.child_key(ps)] = head
        child.parent, child.key = head, child.key[m:]
        head.hash_value, child.hash_value = split_node_hash_value(child.hash_value, m, ps)
        head.event_hash_value, child.event_hash_value = split_node_hash_value(child.event_hash_value, m, ps)
        self.io.narrow(child, m)
        return head

    def _take_request_slots(self, node: TreeNode, slots: torch.Tensor) -> None:
        if node.lock_ref > 0:
            raise RuntimeError("kvtc invariant broken: a node below a compressed node is locked")
        if node.value is not None:  # device node below a compressed one: same tokens, same positions
            if node in self.guards.pending:
                self.guards.wait_pending()  # the encoder reads these rows
            self.free_slots(node.value)
            node.value = slots.clone()  # a job still listing the old slots is discarded at its commit
            return
        entry = self.io.pop(node) if node in self.io.entries else None
        self.give_slots(node, slots)
        if entry is not None:
            self.io.retain(node, entry)
        self.stats.adopted_tokens += len(slots)
