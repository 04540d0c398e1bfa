"""The books of which radix nodes have blobs, with the blob store and the counters. It never changes the
tree (``KVTCRadixCache`` does) and runs no codec (:class:`~kvtc_sglang.cache.controller.KVTCController` does).

A node's blob is in one of two books:

- ``entries``: *compressed* nodes (``node.value is None``); the blob is the only copy of their KV;
- ``retained``: *device* nodes that still hold their blob (restored, or adopted by an insert). Going cold
  again only frees their slots: already-lossy KV is never re-encoded, and no encode work is repeated.

A blob is in the pool's store or in host memory (:class:`~kvtc_sglang.cache.placement.BlobPlacement` frees it
where it is; :meth:`Transcoder.rehome` records a move).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..codec.blob import BlobHeader
from .joint import JointBook, JointLink
from .kv_io import PoolKV
from .placement import BlobPlacement
from .policy import CompressionPolicy
from .stats import KVTCStats
from .store import BlobHandle
from .tree_walk import TreeNode


@dataclass(frozen=True)
class CompressedNode:
    """One blob: the ``num_tokens`` tokens at positions ``start..`` it encodes. The node it belongs to covers
    its tokens ``[skip, num_tokens)`` (``skip > 0`` after an insert took the head of the node)."""

    handle: BlobHandle
    start: int  # RoPE position of the blob's first token
    num_tokens: int
    raw_bytes: int
    header: BlobHeader  # parsed when the blob was made (kept on the host: a restore copies no header)
    skip: int = 0
    restored: bool = False  # decoded at least once (a blob dropped before that was encoded for nothing)
    reference: tuple | None = None  # (K, V) [L, T, H, D] on the host, what the blob decoded to (verify_restores)
    joint: JointLink | None = None  # a residual blob: the shared reference it decodes against (joint.py)

    @property
    def node_tokens(self) -> int:
        return self.num_tokens - self.skip


class Transcoder:
    """Args: ``kv``: the pool's buffers (for the raw size of a token); ``placement``: where blobs live (the
    store, host memory); ``stats``; ``policy``: its blob indexes (victim order) follow these books."""

    def __init__(self, kv: PoolKV, placement: BlobPlacement, stats: KVTCStats, policy: CompressionPolicy) -> None:
        self.placement = placement
        self.store = placement.store
        self.stats = stats
        self.policy = policy
        self.joint: JointBook | None = None  # joint encoding: references released with their last dependant
        self.entries: dict[TreeNode, CompressedNode] = {}
        self.retained: dict[TreeNode, CompressedNode] = {}
        kb = kv.k_buffers[0]
        self.token_bytes = 2 * len(kv.k_buffers) * kb[0].numel() * kb.element_size()  # raw KV bytes per token

    def make_entry(
        self, handle: BlobHandle, start: int, num_tokens: int, header: BlobHeader, *, reference: tuple | None = None,
        joint: JointLink | None = None,
    ) -> CompressedNode:
        entry = CompressedNode(handle, start, num_tokens, num_tokens * self.token_bytes, header, reference=reference,
                               joint=joint)
        if joint is not None and self.joint is not None:
            self.joint.depend(joint, num_tokens, handle.nbytes)
        return entry

    def _free(self, entry: CompressedNode) -> None:
        """Give ``entry``'s blob back (and its reference, when it was the last to depend on it)."""
        self.placement.free(entry.handle)
        if entry.joint is not None and self.joint is not None:
            self.joint.release(entry.joint, entry.num_tokens, entry.handle.nbytes)

    # ----- books -----

    def add(self, node: TreeNode, entry: CompressedNode) -> None:
        """``node`` is compressed now; ``entry`` is its blob."""
        self.entries[node] = entry
        self.policy.index_blob(node, kept=False, on_host=entry.handle.on_host)
        self._count(entry, 1)

    def _count(self, entry: CompressedNode, sign: int) -> None:
        s = self.stats
        s.resident_nodes += sign
        s.resident_tokens += sign * entry.node_tokens
        s.resident_raw_bytes += sign * entry.raw_bytes
        s.resident_blob_bytes += sign * entry.handle.nbytes
        s.resident_store_bytes += sign * self.placement.store_bytes(entry.handle)
        if entry.handle.on_host:
            s.host_resident_nodes += sign
            s.host_resident_tokens += sign * entry.node_tokens
            s.host_resident_raw_bytes += sign * entry.raw_bytes

    def pop(self, node: TreeNode) -> CompressedNode:
        """Take ``node`` out of the compressed book (its blob stays stored)."""
        entry = self.entries.pop(node)
        self.policy.unindex_blob(node)
        self._count(entry, -1)
        return entry

    def rehome(self, node: TreeNode, handle: BlobHandle) -> None:
        """Compressed ``node``'s blob moved (the store to host memory): ``handle`` is where it is now."""
        entry = self.pop(node)
        self.add(node, replace(entry, handle=handle))

    def narrow(self, node: TreeNode, head_tokens: int) -> None:
        """The first ``head_tokens`` of compressed ``node`` left it (an insert took them)."""
        entry = self.pop(node)
        self.add(node, replace(entry, skip=entry.skip + head_tokens))

    def retain(self, node: TreeNode, entry: CompressedNode) -> None:
        """Keep ``entry`` for device ``node`` if the blob covers exactly the node; else free it."""
        if entry.skip:
            self._free(entry)
            return
        self.retained[node] = entry
        self.policy.index_blob(node, kept=True)
        self.stats.retained_tokens += entry.num_tokens

    def take_retained(self, node: TreeNode) -> CompressedNode:
        entry = self.retained.pop(node)
        self.policy.unindex_blob(node)
        self.stats.retained_tokens -= entry.num_tokens
        return entry

    def drop_retained(self, node: TreeNode) -> None:
        if node in self.retained:
            entry = self.take_retained(node)
            self._free(entry)
            self.stats.dropped_kept_tokens += entry.num_tokens
            if not entry.restored:
                self.stats.discarded_encoded_tokens += entry.num_tokens

    def free_dropped(self, node: TreeNode) -> CompressedNode:
        """Compressed ``node`` leaves the tree: its blob is freed and counted as dropped."""
        entry = self.pop(node)
        self._free(entry)
        s = self.stats
        if entry.handle.on_host:
            s.host_dropped_tokens += entry.node_tokens
        s.dropped_nodes += 1
        s.dropped_tokens += entry.node_tokens
        if not entry.restored:
            s.dropped_unused_tokens += entry.node_tokens
        return entry

    def clear(self) -> None:
        """Forget every blob and give the store's pages back."""
        for entry in [*self.entries.values(), *self.retained.values()]:
            self._free(entry)
        self.entries, self.retained = {}, {}
        if self.joint is not None:
            self.joint.clear()
        self.policy.clear()
        s = self.stats
        s.resident_nodes = s.resident_tokens = s.resident_raw_bytes = s.resident_blob_bytes = 0
        s.resident_store_bytes = 0
        s.host_resident_nodes = s.host_resident_tokens = s.host_resident_raw_bytes = 0
        s.retained_tokens = 0
