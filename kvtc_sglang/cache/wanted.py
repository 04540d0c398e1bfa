"""Blobs SGLang's admission may not take (a part of :class:`~kvtc_sglang.cache.radix.KVTCRadixCache`'s
accounting).

A compressed node's blob frees ~17 cached tokens per store slot it gives back, so admitting another request
on those slots before the owner's next turn comes back is a bad trade. A blob is *wanted* for
``WANTED_TICKS`` scheduler passes after it was compressed or reached by a scheduler match or SGLang's FCFS
refresh of waiting prefixes (``touch_prefix``); the cache reports wanted blobs' store slots as protected,
not evictable. A request that fits the pool only with them must not wait forever, so they count as
evictable again

- once nothing has run for ``IDLE_TICKS`` passes (FCFS admission stops at a head request that does not fit,
  so the running requests drain and it gets in), and
- while a request the scheduler matched ``STARVE_TICKS`` passes ago is still being matched as waiting (any
  policy: ``lpm`` admits cached requests ahead of a newcomer, and a long generation keeps the pool busy).

Ticks, not clocks: every rank decides alike.
"""

from __future__ import annotations

from collections.abc import Mapping

from .store import BlobStore
from .transcode import CompressedNode
from .tree_walk import TreeNode

WANTED_TICKS = 1000  # scheduler passes a compression or a match keeps a blob's store slots out of admission
IDLE_TICKS = 2  # passes with nothing running after which wanted slots are admission room again
STARVE_TICKS = 256  # passes a request may wait (matched, not admitted) before wanted slots are room again


class WantedBlobs:
    """``node -> tick`` of the last compression or match of each wanted compressed node, and how long each
    request matched has waited. Disabled (``protect_wanted=False``), it records nothing and reports no
    slots: no work per pass or match."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._tick_of: dict[TreeNode, int] = {}
        self.idle_ticks = 0  # consecutive passes with no locked node (nothing running)
        self._waiting: dict[str, list[int]] = {}  # request id -> [first, last] pass it was matched waiting
        self._starving_tick = -(1 << 30)  # last pass a request matched had waited STARVE_TICKS passes
        self._now = 0

    def __len__(self) -> int:
        return len(self._tick_of)

    def clear(self) -> None:
        self._tick_of.clear()
        self._waiting.clear()
        self._starving_tick = -(1 << 30)

    @property
    def starving(self) -> bool:
        """A request matched in this pass or the last one has waited ``STARVE_TICKS`` passes: wanted slots
        are admission room until it is admitted."""
        return self._starving_tick >= self._now - 1

    def waiting(self, rid: str, tick: int) -> bool:
        """A scheduler match of request ``rid`` (SGLang matches the requests it tries to admit, and with a
        cache-aware policy every waiting one). True when it makes this pass a starving one (first time)."""
        if not self.enabled:
            return False
        seen = self._waiting.setdefault(rid, [tick, tick])
        seen[1] = tick
        if tick - seen[0] < STARVE_TICKS or self._starving_tick == tick:
            return False
        self._starving_tick = tick
        return True

    def admitted(self, rid: str) -> None:
        """Request ``rid`` got in (its restore ran): its wait is over."""
        self._waiting.pop(rid, None)

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
        self._now = tick
        self.idle_ticks = 0 if running else self.idle_ticks + 1
        if self._waiting and tick % STARVE_TICKS == 0:  # forget requests not matched for WANTED_TICKS passes
            self._waiting = {r: s for r, s in self._waiting.items() if s[1] >= tick - WANTED_TICKS}
        if self._tick_of:
            horizon = tick - WANTED_TICKS
            self._tick_of = {n: t for n, t in self._tick_of.items() if t >= horizon and n in entries}

    def slots(self, entries: Mapping[TreeNode, CompressedNode], store: BlobStore) -> int:
        """Store slots of the wanted blobs (block count over ``2L`` blocks per slot), 0 once idle or while a
        request starves."""
        if self.idle_ticks >= IDLE_TICKS or not self._tick_of or self.starving:
            return 0
        per_slot = store.blocks_per_page // store.page_size  # 2L buffers: blocks per slot
        blocks = sum(e.handle.blocks.numel() for n in self._tick_of if (e := entries.get(n)) is not None)
        return min(store.num_slots, -(-blocks // per_slot))
