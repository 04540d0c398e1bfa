"""Tree surgery of :class:`~kvtc_sglang.cache.radix.KVTCRadixCache` (its base class; the public protocol
methods are in ``radix.py``). Every change of a node between device and compressed happens here, with
SGLang's ``evictable_size_``, ``evictable_leaves`` and KV events kept as ``RadixCache`` keeps them."""

from __future__ import annotations

import logging
import time

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode
from sglang.srt.mem_cache.utils import split_node_hash_value

from ..codec import BlobError
from .eviction import TreeEviction

logger = logging.getLogger(__name__)


class TreeSurgery(TreeEviction):
    # ----- walking -----

    def _match(self, key: RadixKey, split: bool = True) -> tuple[int, TreeNode, int, TreeNode]:
        """``(device tokens, last device node, tokens after the first compressed node, deepest node)``.

        Nothing is restored; a match ending inside a device node splits it (as SGLang's does), one ending
        inside a compressed node counts its matched tokens (``init_load_back`` restores and then splits)."""
        now = time.monotonic()
        node, offset = self.root_node, 0
        node.last_access_time = now
        device_len, host_len, last_device, best, in_host = 0, 0, node, node, False
        while offset < len(key):
            child = node.children.get(key.child_key_at(offset, self.page_size))
            if child is None:
                break
            m = child.key.match_at(key, offset, page_size=self.page_size)
            child.last_access_time = now
            in_host = in_host or child in self.io.entries
            if m < len(child.key):
                if not split:
                    break
                if child not in self.io.entries:
                    child = self._split_node(child.key, child, m)
            if in_host:
                host_len, best = host_len + m, child
            else:
                device_len, last_device, best = device_len + m, child, child
            if m < len(child.key):
                break
            node, offset = child, offset + m
        return device_len, last_device, host_len, best

    def _path_to(self, node: TreeNode) -> list[TreeNode]:
        """Nodes from the root's child down to ``node``; empty if ``node`` is the root or was detached."""
        path = []
        while node is not None and node is not self.root_node:
            path.append(node)
            node = node.parent
        return path[::-1] if node is self.root_node else []

    # ----- device <-> compressed -----

    def _release_slots(self, node: TreeNode) -> int:
        n = len(node.value)
        self.token_to_kv_pool_allocator.free(node.value)
        node.value = None
        self.evictable_size_ -= n
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)
        return n

    def _give_slots(self, node: TreeNode, slots: torch.Tensor) -> None:
        """A slot-less node (compressed, or just split off one) becomes a device node on ``slots``."""
        self.policy.tree_version += 1  # a new compression candidate
        node.value = slots.clone()
        self.evictable_size_ += len(slots)
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)

    def _alloc_slots(self, num_tokens: int) -> torch.Tensor | None:
        allocator = self.token_to_kv_pool_allocator
        short = num_tokens - allocator.available_size()
        if short > 0:
            if short > self.evictable_size():
                return None  # even dropping every unlocked token would not do: touch nothing
            self.evict(EvictParams(num_tokens=short))
        return allocator.alloc(num_tokens) if allocator.available_size() >= num_tokens else None

    def _restore(self, node: TreeNode) -> bool:
        """Decode compressed ``node`` into fresh slots (it keeps its blob); ``False`` if it cannot."""
        entry = self.io.entries[node]
        slots = self._alloc_slots(entry.num_tokens)  # may compress or evict others, never ``_protect``
        if slots is None:
            self.stats.restore_no_memory += 1
            return False
        try:  # every check runs before the first row is written: a bad blob leaves the slots untouched
            self.io.decode_into(entry, slots)
        except BlobError as e:
            logger.warning("kvtc: dropping a compressed node of %d tokens: %s", entry.node_tokens, e)
            self.token_to_kv_pool_allocator.free(slots)
            self.stats.checksum_failures += 1
            self._drop_subtree(node)
            return False
        self.io.pop(node)
        if entry.skip:
            self.token_to_kv_pool_allocator.free(slots[: entry.skip])  # rows of the part an insert took
        self._give_slots(node, slots[entry.skip :])
        self.io.retain(node, entry)
        self.stats.restores += 1
        self.stats.restored_tokens += entry.node_tokens
        return True

    # ----- insert -----

    def _adopt_insert_path(self, key: RadixKey, value: torch.Tensor) -> int | None:
        """From the first compressed node on ``key``'s path on, the tree takes the request's own slots
        ``value`` (``[len(key)]`` int64): compressed nodes become device nodes on them (an exact copy of
        what they encode; the blob is kept), device nodes below give their own slots back. Returns the
        depth of the first compressed node, ``None`` if the path has none. Nothing is allocated."""
        node, offset, first = self.root_node, 0, None
        while offset < len(key):
            child = node.children.get(key.child_key_at(offset, self.page_size))
            if child is None:
                break
            m = child.key.match_at(key, offset, page_size=self.page_size)
            if first is None and child not in self.io.entries:
                if m < len(child.key):
                    break
                node, offset = child, offset + m
                continue
            if first is None:
                first = offset
            partial = m < len(child.key)
            if partial:
                child = self._split_head(child, m)
            self._take_request_slots(child, value[offset : offset + m])
            if partial:
                break
            node, offset = child, offset + m
        return first

    def _split_head(self, child: TreeNode, m: int) -> TreeNode:
        """Split ``child`` after ``m`` tokens; returns the head. A compressed child keeps its blob for the
        tail (``skip``); the head has no slots yet."""
        if child not in self.io.entries:
            return self._split_node(child.key, child, m)
        head = TreeNode(priority=child.priority)
        head.hit_count = child.hit_count
        head.parent, head.key, head.value = child.parent, child.key[:m], None
        head.children = {child.key[m:].child_key(self.page_size): child}
        head.parent.children[child.key.child_key(self.page_size)] = head
        child.parent, child.key = head, child.key[m:]
        head.hash_value, child.hash_value = split_node_hash_value(child.hash_value, m, self.page_size)
        head.event_hash_value, child.event_hash_value = split_node_hash_value(
            child.event_hash_value, m, self.page_size
        )
        self.io.narrow(child, m)
        return head

    def _take_request_slots(self, node: TreeNode, slots: torch.Tensor) -> None:
        if node.lock_ref > 0:
            raise RuntimeError("kvtc invariant broken: a node below a compressed node is locked")
        if node.value is not None:  # device node below a compressed one: same tokens, same positions
            self.token_to_kv_pool_allocator.free(node.value)
            node.value = slots.clone()
            return
        entry = self.io.pop(node) if node in self.io.entries else None
        self._give_slots(node, slots)
        if entry is not None:
            self.io.retain(node, entry)
        self.stats.adopted_tokens += len(slots)

    def _split_node(self, key: RadixKey, child: TreeNode, split_len: int) -> TreeNode:
        if child in self.io.entries:
            raise RuntimeError("kvtc invariant broken: SGLang's split reached a compressed node")
        self.io.drop_retained(child)  # its blob covers the whole node
        self.policy.tree_version += 1  # the child's span moved
        return super()._split_node(key, child, split_len)

    # ----- compression -----

    def _compress_cold(self, need: int | None, now: float | None) -> int:
        """Compress eligible nodes, LRU first (idle ones only when ``now`` is given) until ``need`` slots
        are free (all of them for ``None``); returns slots freed net of what the store borrowed."""
        cands = self.policy.compress_order(self.root_node)
        version, drops = self.policy.tree_version, self.policy.drops
        store_before, freed, i, passed = self.store.num_slots, 0, 0, []

        def net() -> int:  # slots freed so far, less what the store borrowed to hold the blobs
            return freed - (self.store.num_slots - store_before)

        while i < len(cands) and (need is None or net() < need):
            targets, planned = [], 0
            # the same measure as the outer loop: with a smaller one (gross ``freed``) this loop could take no
            # candidate while the outer one still wants more, and spin for ever
            while i < len(cands) and (need is None or net() + planned < need):
                cand, start, lo, hi = cands[i]
                i += 1
                if cand.parent is None or cand.value is None:
                    continue  # compressed or dropped since the candidates were listed
                busy = cand.lock_ref > 0 or cand in self._protect
                if busy or (now is not None and not self.policy.is_idle(cand, now)):
                    passed.append(cands[i - 1])  # still a candidate for a later call
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
        if self.policy.drops == drops:  # only listed nodes were split or compressed: the rest is still valid
            self.policy.keep_candidates(version, passed + cands[i:])
        return net()

    def _compress_many(self, targets: list[tuple[TreeNode, int]]) -> int:
        """Compress device nodes ``(node, start position)``; returns the slots freed. Nodes with a kept blob
        only free their slots; the others are encoded in one codec call, then stored one by one."""
        fresh = [(n, lo) for n, lo in targets if n not in self.io.retained]
        blobs = dict(zip([id(n) for n, _ in fresh], self.io.encode([(n.value, lo) for n, lo in fresh]), strict=True))
        freed = 0
        for node, start in targets:
            if node.parent is None or node.value is None:
                continue  # dropped while making room for an earlier target
            if node in self.io.retained:
                entry = self.io.take_retained(node)
                self.stats.reused_blobs += 1
                self.stats.reused_tokens += entry.num_tokens
            else:
                num_t = len(node.value)
                handle = self._store_blob(node, blobs[id(node)])
                if handle is None:
                    continue
                entry = self.io.make_entry(handle, start, num_t)
            num_t = entry.num_tokens
            if node.value is not None:
                self._release_slots(node)
            self.io.add(node, entry)
            self.stats.compressions += 1
            self.stats.compressed_tokens += num_t
            freed += num_t
        return freed

    def _store_blob(self, node: TreeNode, blob: torch.Tensor):
        """Put ``blob`` in the store, dropping other blobs for room if the store is at its cap. When the pool
        has no free page for the store to borrow, the node's own slots are released first (the blob is
        smaller than its raw KV); its ``value`` is then ``None`` on return."""
        store, ps = self.store, self.page_size
        pages = store.pages_needed(blob.numel())
        if store.num_pages + pages > store.max_pages:
            self._make_store_room(pages, keep=node)
            pages = store.pages_needed(blob.numel())
        if store.num_pages + pages > store.max_pages:
            self.stats.store_full += 1
            return None
        allocator = self.token_to_kv_pool_allocator
        if allocator.available_size() < pages * ps:
            if len(node.value) < pages * ps or allocator.free_group is not None:
                self.stats.store_full += 1
                return None
            num_t = self._release_slots(node)
            handle = store.put(blob)
            if handle is None:
                raise RuntimeError(f"kvtc: {num_t} freed slots did not make room for a {blob.numel()}-byte blob")
            return handle
        return store.put(blob)
