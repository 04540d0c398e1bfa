"""Blobs SGLang's admission may not take (a part of :class:`~kvtc_sglang.cache.radix.KVTCRadixCache`'s
accounting).

A compressed node's blob frees ~17 cached tokens per store slot it gives back, so admitting another request
on those slots before the owner's next turn comes back is a bad trade. A blob is *wanted* for
``WANTED_TICKS`` scheduler passes after it was compressed or reached by a scheduler match or SGLang's FCFS
refresh of waiting prefixes (``touch_prefix``); the cache reports wanted blobs' store slots as protected,
not evictable. Once nothing has run for ``IDLE_TICKS`` passes they count as evictable again: a request that
fits the pool only with them must not wait forever. Ticks, not clocks: every rank decides alike.
"""

from __future__ import annotations

from collections.abc import Mapping

from .store import BlobStore
from .transcode import CompressedNode
from .tree_walk import TreeNode

WANTED_TICKS = 1000  # scheduler passes a compression or a match keeps a blob's store slots out of admission
IDLE_TICKS = 2  # passes with nothing running after which wanted slots are admission room again


class WantedBlobs:
    """``node -> tick`` of the last compression or match of each wanted compressed node. Disabled (the
    default ``protect_wanted=False``), it records nothing and reports no slots: no work per pass or match."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._tick_of: dict[TreeNode, int] = {}
        self.idle_ticks = 0  # consecutive passes with no locked node (nothing running)

    def __len__(self) -> int:
        return len(self._tick_of)

    def clear(self) -> None:
        self._tick_of.clear()

    def mark(self, node: TreeNode, tick: int) -> None:
        if self.enabled:
            self._tick_of[node] = tick

    def mark_path(self, node: TreeNode | None, tick: int, entries: Mapping[TreeNode, CompressedNode]) -> None:
        """A scheduler match reached ``node``: it and its compressed ancestors are wanted now."""
        while self.enabled and node is not None and node.parent is not None:
            if node in entries:
                self._tick_of[node] = tick
            node = node.parent

    def on_tick(self, tick: int, running: bool, entries: Mapping[TreeNode, CompressedNode]) -> None:
        """Once per scheduler pass: count idle passes; forget marks older than ``WANTED_TICKS`` and nodes no
        longer compressed (restored or dropped)."""
        if not self.enabled:
            return
        self.idle_ticks = 0 if running else self.idle_ticks + 1
        if self._tick_of:
            horizon = tick - WANTED_TICKS
            self._tick_of = {n: t for n, t in self._tick_of.items() if t >= horizon and n in entries}

    def slots(self, entries: Mapping[TreeNode, CompressedNode], store: BlobStore) -> int:
        """Store slots of the wanted blobs (block count over ``2L`` blocks per slot), 0 once idle."""
        if self.idle_ticks >= IDLE_TICKS or not self._tick_of:
            return 0
        per_slot = store.blocks_per_page // store.page_size  # 2L buffers: blocks per slot
        blocks = sum(e.handle.blocks.numel() for n in self._tick_of if (e := entries.get(n)) is not None)
        return min(store.num_slots, -(-blocks // per_slot))
