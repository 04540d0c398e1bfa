"""Encoding, storing and restoring radix nodes' KV: one object owns the codec, the pool I/O, the blob store,
the counters and the book of which nodes have blobs. It never changes the tree (``KVTCRadixCache`` does).

A node's blob is in one of two books:

- ``entries``: *compressed* nodes (``node.value is None``); the blob is the only copy of their KV;
- ``retained``: *device* nodes that still hold their blob (restored, or adopted by an insert). Going cold
  again only frees their slots: already-lossy KV is never re-encoded, and no encode work is repeated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from ..codec import KVTCCodec
from .kv_io import PoolKV
from .stats import KVTCStats
from .store import BlobHandle, BlobStore
from .tree_walk import TreeNode


@dataclass(frozen=True)
class CompressedNode:
    """One blob: the ``num_tokens`` tokens at positions ``start..`` it encodes. The node it belongs to covers
    its tokens ``[skip, num_tokens)`` (``skip > 0`` after an insert took the head of the node)."""

    handle: BlobHandle
    start: int  # RoPE position of the blob's first token
    num_tokens: int
    raw_bytes: int
    skip: int = 0

    @property
    def node_tokens(self) -> int:
        return self.num_tokens - self.skip


class Transcoder:
    """Args: codec of the served model; ``kv``: the pool's buffers; ``store``: where blobs live; ``stats``."""

    def __init__(self, codec: KVTCCodec, kv: PoolKV, store: BlobStore, stats: KVTCStats) -> None:
        self.codec = codec
        self.kv = kv
        self.store = store
        self.stats = stats
        self.entries: dict[TreeNode, CompressedNode] = {}
        self.retained: dict[TreeNode, CompressedNode] = {}
        kb = kv.k_buffers[0]
        self.token_bytes = 2 * len(kv.k_buffers) * kb[0].numel() * kb.element_size()  # raw KV bytes per token

    # ----- encode / decode -----

    def encode(self, targets: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
        """Blobs (``[nbytes]`` uint8) of pool rows ``(slots [T_i] int64, first position)``, one codec call."""
        if not targets:
            return []
        t0 = time.perf_counter()
        segments = [(slots, torch.arange(lo, lo + len(slots))) for slots, lo in targets]
        # Reads the rows in place (fused Triton kernels on CUDA, gather + torch on CPU).
        blobs = self.codec.encode_rows_many(self.kv.k_buffers, self.kv.v_buffers, segments)
        self.stats.compress_seconds += time.perf_counter() - t0
        return blobs

    def decode_into(self, entry: CompressedNode, slots: torch.Tensor) -> None:
        """Write the blob's ``num_tokens`` rows into pool ``slots`` (``[num_tokens]`` int64).

        Raises ``BlobError`` before writing anything when the blob is damaged."""
        t0 = time.perf_counter()
        positions = torch.arange(entry.start, entry.start + entry.num_tokens)
        self.codec.decode_rows(self.store.get(entry.handle), self.kv.k_buffers, self.kv.v_buffers, slots, positions)
        self.stats.restore_seconds += time.perf_counter() - t0

    def make_entry(self, handle: BlobHandle, start: int, num_tokens: int) -> CompressedNode:
        return CompressedNode(handle, start, num_tokens, num_tokens * self.token_bytes)

    # ----- books -----

    def add(self, node: TreeNode, entry: CompressedNode) -> None:
        """``node`` is compressed now; ``entry`` is its blob."""
        self.entries[node] = entry
        s = self.stats
        s.resident_nodes += 1
        s.resident_tokens += entry.node_tokens
        s.resident_raw_bytes += entry.raw_bytes
        s.resident_blob_bytes += entry.handle.nbytes

    def pop(self, node: TreeNode) -> CompressedNode:
        """Take ``node`` out of the compressed book (its blob stays stored)."""
        entry = self.entries.pop(node)
        s = self.stats
        s.resident_nodes -= 1
        s.resident_tokens -= entry.node_tokens
        s.resident_raw_bytes -= entry.raw_bytes
        s.resident_blob_bytes -= entry.handle.nbytes
        return entry

    def narrow(self, node: TreeNode, head_tokens: int) -> None:
        """The first ``head_tokens`` of compressed ``node`` left it (an insert took them)."""
        entry = self.pop(node)
        self.add(node, replace(entry, skip=entry.skip + head_tokens))

    def retain(self, node: TreeNode, entry: CompressedNode) -> None:
        """Keep ``entry`` for device ``node`` if the blob covers exactly the node; else free it."""
        if entry.skip:
            self.store.free(entry.handle)
            return
        self.retained[node] = entry
        self.stats.retained_tokens += entry.num_tokens

    def take_retained(self, node: TreeNode) -> CompressedNode:
        entry = self.retained.pop(node)
        self.stats.retained_tokens -= entry.num_tokens
        return entry

    def drop_retained(self, node: TreeNode) -> None:
        if node in self.retained:
            self.store.free(self.take_retained(node).handle)

    def clear(self) -> None:
        """Forget every blob and give the store's pages back."""
        for entry in [*self.entries.values(), *self.retained.values()]:
            self.store.free(entry.handle)
        self.entries, self.retained = {}, {}
        s = self.stats
        s.resident_nodes = s.resident_tokens = s.resident_raw_bytes = s.resident_blob_bytes = 0
        s.retained_tokens = 0
