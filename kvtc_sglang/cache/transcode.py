"""Moving radix nodes between the KV pool and the compressed store (mixin of ``KVTCRadixCache``).

``_compress_many`` reads device nodes' K/V from every layer at their slots, encodes each at its absolute
positions (its depth) in one codec call, stores the blobs in the arena and frees the slots. ``_revive``
does the reverse into freshly allocated slots, either decoding the blob or copying an inserting
request's identical fresh KV.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from ..codec import BlobError
from .arena import BlobHandle
from .tree_walk import TreeNode

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressedNode:
    """Book-keeping of one compressed node: its blob and the absolute positions it covers."""

    handle: BlobHandle
    start: int  # depth of the node's first token = its RoPE position
    num_tokens: int
    raw_bytes: int


class TranscodeMixin:
    def _compress_many(self, targets: list[tuple[TreeNode, int]]) -> int:
        """Compress device nodes ``(node, start position)``; returns the slots freed.

        All nodes are encoded in one codec call (one batched entropy-coder launch), then stored one by one.
        Making room in the store for one node may drop compressed subtrees that hold a later target;
        such a target is skipped (its slots were freed with its subtree)."""
        t0 = time.perf_counter()
        kv = self.kv
        segments = [(n.value, torch.arange(lo, lo + len(n.value))) for n, lo in targets]
        # Reads the rows in place (fused Triton kernels on CUDA, gather + torch on CPU).
        blobs = self.codec.encode_rows_many(kv.k_buffers, kv.v_buffers, segments)
        row_bytes = 2 * len(kv.k_buffers) * kv.k_buffers[0][0].numel() * kv.k_buffers[0].element_size()
        freed = 0
        for (node, start), blob in zip(targets, blobs, strict=True):
            if node.parent is None or node.value is None:
                continue  # dropped while making room for an earlier target
            handle = self.arena.put(blob)
            if handle is None:
                self._evict_compressed(blob.numel(), keep=node)
                handle = self.arena.put(blob)
                if handle is None:
                    self.stats.store_full += 1
                    continue
            num_t = len(node.value)
            self.token_to_kv_pool_allocator.free(node.value)
            node.value = None
            self.evictable_size_ -= num_t
            raw = num_t * row_bytes
            self.compressed[node] = CompressedNode(handle, start, num_t, raw)
            s = self.stats
            s.compressions += 1
            s.compressed_tokens += num_t
            s.resident_nodes += 1
            s.resident_tokens += num_t
            s.resident_raw_bytes += raw
            s.resident_blob_bytes += handle.nbytes
            self._update_leaf_status(node)
            self._update_leaf_status(node.parent)
            freed += num_t
        self.stats.compress_seconds += time.perf_counter() - t0
        return freed

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
        entry = self.compressed[node]
        slots = self._alloc_slots(entry.num_tokens, keep=node)  # may compress or evict others (timed there)
        if slots is None:
            self.stats.restore_no_memory += 1
            return False
        t0 = time.perf_counter()
        if source is not None:
            self.kv.copy(source, slots)
            self.stats.adopted_tokens += entry.num_tokens
        else:
            try:  # every check runs before the first row is written: a bad blob leaves the slots untouched
                positions = torch.arange(entry.start, entry.start + entry.num_tokens)
                self.codec.decode_rows(
                    self.arena.get(entry.handle), self.kv.k_buffers, self.kv.v_buffers, slots, positions
                )
            except BlobError as e:
                logger.warning("kvtc: dropping a compressed node of %d tokens: %s", entry.num_tokens, e)
                self.token_to_kv_pool_allocator.free(slots)
                self.stats.checksum_failures += 1
                self._drop_subtree(node)
                return False
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
