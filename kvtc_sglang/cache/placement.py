"""Where each blob lives and how it moves: the KV pool's blob store or host memory (the tree asks, this moves).

A compressed node's blob starts in the pool's :class:`~kvtc_sglang.cache.store.BlobStore`. When the store must
give room (a newer blob, admission), the tree asks :meth:`BlobPlacement.demote` before it drops a compressed
node: with a host tier (``host_bytes > 0``) the blob's bytes move to host memory and the node stays in the
tree, compressed; a match restores it through the same one-call restore as a blob in the store. Host memory
has its own LRU order of blobs (``CompressionPolicy.host``): a blob that must leave it goes with its node
(and subtree), as a blob leaving the store did before. One LRU order across tiers: the store's oldest blob
moves to host, host memory's oldest is dropped.

A new blob the store cannot take at all (larger than its cap, or the store full of blobs admission protects;
always so for the raw codec's 1x blobs) starts in host memory (:meth:`BlobPlacement.adopt`) rather than being
thrown away.

Costs: a demotion copies the blob once (on a GPU, an asynchronous copy to pinned memory on kvtc's ``host``
stream after the blob's put; the store rows it read are freed at once and every kvtc stream that writes rows,
and the next batch, wait on the copy: ``StreamFences.freed``); a restore from host memory reads the pinned
bytes on the read stream after that copy (the blob's ``ready``).

Tensor parallelism: host charges are the blob's store blocks (the ranks' agreed size), so every rank's host
tier fills and drops alike; no clock or rank-local size is read.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .stats import KVTCStats
from .store import BlobHandle, BlobStore
from .streams import StreamFences
from .tree_walk import TreeNode


@dataclass
class HostTier:
    """A byte budget for blobs in host memory; the bytes themselves live in each handle's ``host`` tensor."""

    max_bytes: int
    used_bytes: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_bytes, int) or self.max_bytes < 0:
            raise ValueError(f"host tier max_bytes must be an integer >= 0, got {self.max_bytes!r}")

    @property
    def free_bytes(self) -> int:
        return self.max_bytes - self.used_bytes

    def take(self, nbytes: int) -> None:
        if nbytes > self.free_bytes:
            raise RuntimeError(f"host tier over budget: {nbytes} bytes asked, {self.free_bytes} free")
        self.used_bytes += nbytes

    def release(self, nbytes: int) -> None:
        if nbytes > self.used_bytes:
            raise RuntimeError(f"host tier releases {nbytes} bytes, holds {self.used_bytes}")
        self.used_bytes -= nbytes


class BlobPlacement:
    """The blob tiers of one pool: the store (pool rows) and host memory.

    Args:
        store: the pool's blob store.
        fences: the controller's streams (a demotion's copy runs on ``host``).
        stats: the cache's counters (``host_*``).
        host_bytes: the host tier's budget in bytes; 0: no host tier (blobs leaving the store are dropped).
    """

    def __init__(self, store: BlobStore, fences: StreamFences, stats: KVTCStats, host_bytes: int = 0) -> None:
        self.store = store
        self.fences = fences
        self.stats = stats
        self.host = HostTier(host_bytes)

    @property
    def has_host(self) -> bool:
        return self.host.max_bytes > 0

    # ----- reads and frees (every tier) -----

    def fetch(self, handle: BlobHandle) -> torch.Tensor:
        """The blob's bytes ``[nbytes]`` uint8: a copy out of the store, or the host tensor itself."""
        return handle.host if handle.host is not None else self.store.get(handle)

    def free(self, handle: BlobHandle) -> None:
        if handle.host is not None:
            self.host.release(handle.charge)
            self.stats.host_resident_bytes = self.host.used_bytes
        else:
            self.store.free(handle)

    def host_copy(self, handle: BlobHandle) -> tuple[torch.Tensor, Any]:
        """The blob's bytes ``[nbytes]`` uint8 on the host and the event after which they are there (``None``:
        now). A blob in the store is read on kvtc's host stream after its put (nothing else writes its blocks)
        and copied to pinned memory; its blocks may be freed at once, so kvtc's row-writing streams and the next
        batch wait on the copy (``StreamFences.freed``). On the CPU the store's read is already a copy."""
        if handle.host is not None:
            return handle.host, handle.ready
        f = self.fences
        if f.ops is None:
            return self.store.get(handle), None
        with f.enter("host", [handle.ready]):
            dev = self.store.get(handle)
            data = torch.empty(dev.numel(), dtype=torch.uint8, pin_memory=dev.is_cuda)
            data.copy_(dev, non_blocking=True)
        done = f.done("host")
        f.freed(done)
        return data, done

    def store_bytes(self, handle: BlobHandle) -> int:
        """Pool-store bytes the blob holds (0 in host memory)."""
        return handle.blocks.numel() * self.store.row_bytes

    # ----- moves -----

    def charge_of(self, handle: BlobHandle) -> int:
        """Host bytes a blob in the store would take there."""
        return self.store_bytes(handle)

    def demote(
        self, handle: BlobHandle, make_room: Callable[[int], bool] | None = None
    ) -> BlobHandle | None:
        """Move a blob from the store to host memory; its store blocks are freed. ``make_room(bytes)`` may drop
        host blobs first (the tree's choice: it drops their nodes); ``None`` (the caller drops the node) when
        there is no host tier or no room."""
        if not self.has_host or handle.host is not None:
            return None
        charge = self.charge_of(handle)
        if charge > self.host.free_bytes and make_room is not None:
            make_room(charge)
        if charge > self.host.free_bytes:
            self.stats.host_full += 1
            return None
        t0 = time.perf_counter()
        data, done = self.host_copy(handle)
        self.store.free(handle)
        self.host.take(charge)
        self.stats.host_resident_bytes = self.host.used_bytes
        self.stats.host_demotions += 1
        self.stats.host_demoted_bytes += charge
        self.stats.host_seconds += time.perf_counter() - t0
        return BlobHandle(torch.empty(0, dtype=torch.int64), handle.nbytes, ready=done, host=data, charge=charge)

    # ----- what the tree asks -----

    def attach(self, books: Any, policy: Any) -> None:
        """The books of which node holds which blob (a :class:`~kvtc_sglang.cache.transcode.Transcoder`) and
        the policy whose ``host`` index orders host memory's victims."""
        self.books = books
        self.policy = policy

    def demote_node(self, node: TreeNode, spared: set[TreeNode], drop_subtree: Callable[[TreeNode], int]) -> bool:
        """Compressed ``node``'s blob must leave the store: move it to host memory (``True``: the node stays,
        compressed) or leave it to the caller to drop (``False``). Host blobs leave for room LRU first, leaves
        before inner nodes, with their nodes and subtrees (``drop_subtree``); ``spared``, ``node`` and its
        ancestors are never among them."""
        entry = self.books.entries.get(node)
        if entry is None or entry.handle.on_host or not self.has_host:
            return False
        keep = spared_path(node, spared)
        handle = self.demote(entry.handle, lambda nbytes: self._make_room(nbytes, keep, drop_subtree))
        if handle is None:
            return False
        self.books.rehome(node, handle)
        self.stats.host_demoted_tokens += entry.node_tokens
        return True

    def _make_room(self, nbytes: int, keep: set[TreeNode], drop_subtree: Callable[[TreeNode], int]) -> bool:
        """Drop host blobs' nodes (not ``keep``), LRU leaves first, until ``nbytes`` fit; whether they do."""

        def holds(n: TreeNode, _kept: bool) -> bool:
            e = self.books.entries.get(n)
            return e is not None and e.handle.on_host

        def drop(victim: TreeNode, _kept: bool) -> bool:
            drop_subtree(victim)
            return self.host.free_bytes >= nbytes

        if self.host.free_bytes < nbytes <= self.host.max_bytes:
            self.policy.offer_host(keep, holds, drop)
        return self.host.free_bytes >= nbytes

    def admit(
        self, blob: torch.Tensor, node: TreeNode, spared: set[TreeNode], drop_subtree: Callable[[TreeNode], int],
        charge: int = 0,
    ) -> BlobHandle | None:
        """A blob fetched from L3 (``[nbytes]`` uint8 on the host) into host memory, for a node to hang under
        ``node``, charged ``max(charge, nbytes)`` (the ranks' agreed size); ``None`` when it does not fit
        (nothing is dropped from ``node``'s path or ``spared``)."""
        charge = max(charge, blob.numel())
        if not self.has_host or not self._make_room(charge, spared_path(node, spared), drop_subtree):
            self.stats.host_full += 1
            return None
        data = blob.pin_memory() if self.store.device.type == "cuda" else blob
        self.host.take(charge)
        self.stats.host_resident_bytes = self.host.used_bytes
        return BlobHandle(torch.empty(0, dtype=torch.int64), charge, host=data, charge=charge)

    def adopt(
        self, blob: torch.Tensor, ready: Any, charge: int, node: TreeNode, *, spared: set[TreeNode],
        drop_subtree: Callable[[TreeNode], int],
    ) -> BlobHandle | None:
        """A new blob the store could not take (``[n]`` uint8 where it was made, ready after ``ready``) straight
        into host memory, charged ``charge`` bytes (the ranks' agreed size); ``None`` when it does not fit."""
        if not self._make_room(charge, spared_path(node, spared), drop_subtree):
            self.stats.host_full += 1
            return None
        f = self.fences
        done = None
        if blob.is_cuda:
            with f.enter("host", [ready]):
                data = torch.empty(blob.numel(), dtype=torch.uint8, pin_memory=True)
                data.copy_(blob, non_blocking=True)
            f.keep("host", blob)
            done = f.done("host")
        else:
            data = blob
        self.host.take(charge)
        self.stats.host_resident_bytes = self.host.used_bytes
        self.stats.host_adopted += 1
        return BlobHandle(torch.empty(0, dtype=torch.int64), blob.numel(), ready=done, host=data, charge=charge)

    def count_restored(self, entries: list[Any]) -> None:
        """Restored blobs: count the host tier's hits."""
        for e in entries:
            if e.handle.on_host:
                self.stats.host_restores += 1
                self.stats.host_restored_tokens += e.node_tokens


def spared_path(node: TreeNode | None, protect: set[TreeNode]) -> set[TreeNode]:
    """``protect`` plus ``node`` and its ancestors: dropping an ancestor would drop ``node`` with it."""
    spared = set(protect)
    while node is not None:
        spared.add(node)
        node = node.parent
    return spared
