"""Tree surgery of :class:`~kvtc_sglang.cache.radix.KVTCRadixCache` (its base class; the public protocol
methods are in ``radix.py``). Every change of a node between device and compressed happens here or in
``compression.py``, with SGLang's ``evictable_size_``, ``evictable_leaves`` and KV events kept as
``RadixCache`` keeps them."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

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

    def _free_slots(self, slots: torch.Tensor) -> None:
        """Give tree-owned slots back: page-aligned runs of a KV row, so SGLang's sync-free segment free."""
        self.token_to_kv_pool_allocator.free_segment(slots, start_pos=0)

    def _release_slots(self, node: TreeNode) -> int:
        n = len(node.value)
        self._free_slots(node.value)
        node.value = None
        self.evictable_size_ -= n
        self.policy.candidates.discard(node)
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)
        return n

    def _give_slots(self, node: TreeNode, slots: torch.Tensor) -> None:
        """A slot-less node (compressed, or just split off one) becomes a device node on ``slots``."""
        node.value = slots.clone()
        self.evictable_size_ += len(slots)
        self._update_leaf_status(node)
        self._update_leaf_status(node.parent)
        self.policy.candidates.add(node)

    def _alloc_slots(self, num_tokens: int) -> torch.Tensor | None:
        allocator = self.token_to_kv_pool_allocator
        short = num_tokens - allocator.available_size()
        if short > 0:
            if short > self.evictable_size_ + self.store.num_slots:  # wanted blobs count: this is their restore
                return None  # even dropping every unlocked token would not do: touch nothing
            self.evict(EvictParams(num_tokens=short))
        return allocator.alloc(num_tokens) if allocator.available_size() >= num_tokens else None

    def _restore_many(self, nodes: list[TreeNode]) -> bool:
        """Decode compressed ``nodes`` (one path, top down) into fresh slots with one codec call; each keeps its
        blob. ``False`` if it cannot: no memory, a damaged blob (that node is dropped, the rest stay
        compressed), or any other failure of the decode (logged); the slots are given back either way."""
        entries = [self.io.entries[n] for n in nodes]
        total = sum(e.num_tokens for e in entries)
        slots = self._alloc_slots(total)  # may evict others, never ``_protect``
        if slots is None:
            self.stats.restore_no_memory += 1
            return False
        parts = list(torch.split(slots, [e.num_tokens for e in entries]))  # page multiples: pages stay whole
        targets = [(p, torch.arange(e.start, e.start + e.num_tokens)) for p, e in zip(parts, entries, strict=True)]
        t0 = time.perf_counter()
        bad: int | None = None  # the damaged blob's index
        error: Exception | None = None
        try:  # every check runs before the first row is written: a bad blob leaves the slots untouched
            self.ctl.restore(
                lambda: [self.placement.fetch(e.handle) for e in entries], [e.header for e in entries], targets,
                ready=[e.handle.ready for e in entries],
                references=[e.reference for e in entries] if self.ctl.verify else None,
            )
        except BlobError as e:
            bad, error = e.blob_index or 0, e
        except (RuntimeError, ValueError, MemoryError) as e:  # CUDA OOM, nvCOMP, a bug: recompute, never wrong KV
            logger.exception("kvtc: a restore of %d tokens failed; the request recomputes them", total)
            error = e
        finally:
            self.stats.restore_seconds += time.perf_counter() - t0
        # Every rank takes the same path: a blob damaged or a decode failed on any rank is a miss on all.
        flags = [0] * (len(nodes) + 1)
        if bad is not None:
            flags[bad] = 1
        elif error is not None:
            flags[-1] = 1
        flags = self.ctl.agreement.max_each(flags)
        if any(flags):
            self._free_slots(slots)
            if any(flags[:-1]):
                victim = nodes[flags.index(1)]
                logger.warning(
                    "kvtc: dropping a compressed node of %d tokens: %s", self.io.entries[victim].node_tokens,
                    error if bad is not None else "its blob failed its checks on another tensor-parallel rank",
                )
                self.stats.checksum_failures += 1
                self.ctl.digest.mix("restore_damaged", total, flags.index(1))
                self._drop_subtree(victim)
            else:
                self.stats.restore_failures += 1
                self.ctl.digest.mix("restore_failed", total, len(nodes))
            return False
        self.ctl.digest.mix("restore", total, len(nodes))
        self.placement.count_restored(entries)
        for node, entry, part in zip(nodes, entries, parts, strict=True):
            self.io.pop(node)
            if entry.skip:
                self._free_slots(part[: entry.skip])  # rows of the part an insert took
            self._give_slots(node, part[entry.skip :])
            self.io.retain(node, replace(entry, restored=True))
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
            if node in self._pending:
                self._wait_pending()  # the encoder reads these rows
            self._free_slots(node.value)
            node.value = slots.clone()  # a job still listing the old slots is discarded at its commit
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
        head = super()._split_node(key, child, split_len)
        job = self._pending.get(child)
        if job is not None:
            self._pending[head] = job  # the encoder still reads these rows; the job is discarded at commit
        self.policy.candidates.add(head)
        self.policy.candidates.add(child)
        return head

