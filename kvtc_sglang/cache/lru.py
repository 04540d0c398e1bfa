"""A least-recently-used order of radix nodes kept per node: no walk or sort of the whole tree.

SGLang stamps ``node.last_access_time`` itself (matches, inserts), without telling the cache. The index
keeps a lazy min-heap of ``(stamp when queued, seq, node)``: a popped entry whose node has been used since
(its stamp grew) goes back with the new stamp, so what comes out is in true LRU order as long as stamps
only grow, which SGLang's monotonic clock guarantees. Membership is a dict; duplicates and entries of
nodes that left are dropped when they surface. The heap is rebuilt when stale entries outnumber live ones.
"""

from __future__ import annotations

import heapq
import itertools

from .tree_walk import TreeNode


class LruIndex:
    """Nodes in least-recently-used order; ``add`` and ``discard`` are O(log n), ``pop`` amortised O(log n)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, TreeNode]] = []
        self._queued: dict[TreeNode, int] = {}  # node -> seq of its live heap entry
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._queued)

    def __contains__(self, node: TreeNode) -> bool:
        return node in self._queued

    def add(self, node: TreeNode) -> None:
        """Queue ``node``; a node already queued stays where it is (``pop`` corrects an outdated stamp)."""
        if node not in self._queued:
            self._push(node)

    def _push(self, node: TreeNode) -> None:
        seq = next(self._seq)
        self._queued[node] = seq
        heapq.heappush(self._heap, (node.last_access_time, seq, node))
        if len(self._heap) > 2 * len(self._queued) + 1024:
            self._compact()

    def discard(self, node: TreeNode) -> None:
        self._queued.pop(node, None)  # its heap entry goes when it surfaces

    def clear(self) -> None:
        self._heap, self._queued = [], {}

    def pop(self) -> TreeNode | None:
        """The least recently used queued node (removed from the index), or ``None`` when empty."""
        while self._heap:
            stamp, seq, node = heapq.heappop(self._heap)
            if self._queued.get(node) != seq:
                continue  # discarded, or a newer entry of the same node is queued
            if node.last_access_time > stamp:
                self._push(node)  # used since it was queued: back in line under its new stamp
                continue
            del self._queued[node]
            return node
        return None

    def oldest_stamp(self) -> float | None:
        """The stamp of the least recently used node (it stays queued), ``None`` when empty."""
        node = self.pop()
        if node is None:
            return None
        self._push(node)
        return node.last_access_time

    def _compact(self) -> None:
        self._heap = [(n.last_access_time, seq, n) for n, seq in self._queued.items()]
        heapq.heapify(self._heap)
