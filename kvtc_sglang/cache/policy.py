"""The order of things (like SGLang's ``EvictionStrategy``): what to encode first, which blobs give way when
the store needs room, and the steps ``evict`` takes. The policy keeps its own per-node indexes; it never
changes the tree, and nothing in it walks or sorts the whole tree.

Three LRU indexes (:class:`~kvtc_sglang.cache.lru.LruIndex`):

- ``candidates``: device nodes that may have an encodable span. A node enters when it gains slots or when
  something changes on its path (an insert below it, an unlock, a drop below it); it leaves when it is
  taken, when it turns out to have no span (its window covers it), or when it leaves the tree. A lock or
  unlock of one path touches only that path: nothing invalidates the whole index.
- ``encoded``: device nodes holding a kept blob. ``evict`` frees their slots first (no encode, no wait).
- ``compressed``: nodes whose only copy is a blob in the store; with ``encoded``, the store's victims.
- ``host``: nodes whose only copy is a blob in host memory (:mod:`~kvtc_sglang.cache.placement`): the host
  tier's victims. A kept blob stays in ``encoded`` wherever it is (``free_encoded`` finds it there).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from .config import KVTCCacheConfig
from .lru import LruIndex
from .tree_walk import TreeNode

Span = tuple[TreeNode, int, int, int]  # (node, start, lo, hi): the node starts at depth ``start``, encodes [lo, hi)


def node_start(node: TreeNode) -> int:
    """Depth of ``node``'s first token (the sum of its ancestors' key lengths)."""
    depth, up = 0, node.parent
    while up is not None and up.parent is not None:
        depth += len(up.key)
        up = up.parent
    return depth


def shallowest_leaf_end(node: TreeNode, end: int) -> int:
    """End depth of the shallowest leaf under ``node`` (``end`` when it is a leaf), best-first: only the
    nodes that start above that leaf's end are visited."""
    frontier = [(end + len(c.key), id(c), c) for c in node.children.values()]
    if not frontier:
        return end
    heapq.heapify(frontier)
    while True:
        child_end, _, child = heapq.heappop(frontier)
        if not child.children:
            return child_end
        for c in child.children.values():
            heapq.heappush(frontier, (child_end + len(c.key), id(c), c))


def split_at_chunks(spans: list[Span], chunk: int) -> list[Span]:
    """``spans`` cut at multiples of ``chunk`` positions (0: unchanged), in order; each later piece of a span
    names the node as it will be after the earlier pieces are cut off (it then starts at the piece's ``lo``)."""
    if chunk <= 0:
        return spans
    out: list[Span] = []
    for node, start, lo, hi in spans:
        cuts = [lo, *range((lo // chunk + 1) * chunk, hi, chunk), hi]
        out.append((node, start, cuts[0], cuts[1]))
        out.extend((node, a, a, b) for a, b in zip(cuts[1:-1], cuts[2:], strict=True))
    return out


class CompressionPolicy:
    """Least-recently-used everywhere; kept blobs of device nodes go before compressed nodes when the store
    needs room (dropping them loses no cached KV), compressed leaves before compressed inner nodes.

    ``evict`` steps, in order, each only while slots are still short: ``free_encoded`` (device nodes whose
    blob is already made: freeing their slots is instant and loses nothing), ``encode_inline`` (the encoder
    fell behind: encode the coldest unlocked nodes now, bounded, and free them: cached KV is kept compressed
    rather than dropped, for one encode per slot freed), ``device_leaves`` (SGLang's LRU leaf eviction of
    leaves with nothing compressed below: one token recomputed per slot if it is asked for again),
    ``kept_blobs`` (drop the kept blobs of nodes that cannot be freed now, locked ones: no KV is lost, but a
    blob frees only ~1/17 of a slot per token, and the node's next compression encodes all of it again:
    ~17 encodes per slot, about a prefill's cost per slot for SmolLM2 on a CPU; on SGLang's agentic trace
    taking them before cold leaves dropped 76k tokens of kept blobs and cost 7 s of re-encoding),
    ``store`` (drop blobs until the store gives pages back: ~17 tokens recomputed per slot),
    ``device_with_compressed`` (leaves whose compressed children go with them). Encoding normally runs ahead,
    in the background.
    """

    evict_steps = (
        "free_encoded", "encode_inline", "device_leaves", "kept_blobs", "store", "device_with_compressed",
    )

    def __init__(self, config: KVTCCacheConfig, page_size: int) -> None:
        ps = page_size
        self.page_size = ps
        self.sink_end = -(-config.sink_tokens // ps) * ps
        self.window = config.window_tokens  # most recent tokens of each leaf path that are never compressed
        self.min_tokens = max(ps, config.min_tokens // ps * ps)
        self.idle_seconds = config.idle_seconds
        self.candidates = LruIndex()
        self.encoded = LruIndex()
        self.compressed = LruIndex()
        self.host = LruIndex()

    def clear(self) -> None:
        for index in (self.candidates, self.encoded, self.compressed, self.host):
            index.clear()

    # ----- candidates -----

    def touch_path(self, node: TreeNode | None) -> None:
        """``node`` and its device ancestors may have (longer) encodable spans now."""
        while node is not None and node.parent is not None:
            if node.value is not None:
                self.candidates.add(node)
            node = node.parent

    def span(self, node: TreeNode) -> Span | None:
        """``(node, start, lo, hi)``: the part of device ``node`` that may be encoded, ``None`` if too short.

        ``lo = max(start, sink_end)``, ``hi = min(end, floor_page(shallowest leaf end below - window))``: the
        sinks and each cached sequence's last ``window`` tokens stay exact."""
        start = node_start(node)
        end = start + len(node.key)
        lo = max(start, self.sink_end)
        hi = min(end, (shallowest_leaf_end(node, end) - self.window) // self.page_size * self.page_size)
        return (node, start, lo, hi) if hi - lo >= self.min_tokens else None

    def take(self, budget: int | None, busy: Callable[[TreeNode], bool], now: float | None = None) -> list[Span]:
        """Spans to encode, LRU first, until ``budget`` tokens (all for ``None``).

        ``busy`` nodes (locked, being encoded or restored) stay queued; nodes used within ``idle_seconds``
        of ``now`` (when given) stop the scan and stay queued (every later one is younger still); nodes
        without a span leave the index until their path changes."""
        out: list[Span] = []
        skipped: list[TreeNode] = []
        planned = 0
        while budget is None or planned < budget:
            node = self.candidates.pop()
            if node is None:
                break
            if node.parent is None or node.value is None or node in self.encoded:
                continue  # left the tree, compressed, or its blob is made already
            if now is not None and now - node.last_access_time < self.idle_seconds:
                skipped.append(node)
                break
            if busy(node):
                skipped.append(node)
                continue
            span = self.span(node)
            if span is not None:
                out.append(span)
                planned += span[3] - span[2]
        for node in skipped:
            self.candidates.add(node)
        return out

    # ----- blobs -----

    def index_blob(self, node: TreeNode, kept: bool, on_host: bool = False) -> None:
        """``node`` holds a blob now: a kept one (device node, ``kept``) or its only copy (compressed), in the
        store or (``on_host``) in host memory."""
        self.unindex_blob(node)
        (self.encoded if kept else self.host if on_host else self.compressed).add(node)

    def unindex_blob(self, node: TreeNode) -> None:
        self.encoded.discard(node)
        self.compressed.discard(node)
        self.host.discard(node)

    def offer_host(
        self, spared: set[TreeNode], holds: Callable[[TreeNode, bool], bool], drop: Callable[[TreeNode, bool], bool]
    ) -> None:
        """Offer compressed nodes whose blobs are in host memory to ``drop(node, False)``, leaves (LRU) before
        inner nodes, until it returns ``True``; the rest stay indexed."""
        self._offer(((self.host, False),), spared, holds, drop)

    def offer_blobs(
        self,
        spared: set[TreeNode],
        holds: Callable[[TreeNode, bool], bool],
        drop: Callable[[TreeNode, bool], bool],
        kept_only: bool = False,
    ) -> None:
        """Offer blobs to ``drop(node, kept)`` in victim order until it returns ``True`` (enough room).

        Kept blobs first (LRU), then compressed leaves (LRU), then compressed inner nodes (an inner node
        takes its subtree along). ``holds(node, kept)`` tells whether a node still holds that kind of blob
        (entries go stale when a node is restored or dropped); nodes passed over or not dropped are
        indexed again. ``kept_only``: kept blobs only (dropping them loses no KV)."""
        kinds = ((self.encoded, True),) if kept_only else ((self.encoded, True), (self.compressed, False))
        self._offer(kinds, spared, holds, drop)

    def _offer(
        self,
        kinds: tuple[tuple[LruIndex, bool], ...],
        spared: set[TreeNode],
        holds: Callable[[TreeNode, bool], bool],
        drop: Callable[[TreeNode, bool], bool],
    ) -> None:
        back: list[tuple[TreeNode, bool]] = []
        inner: list[TreeNode] = []
        home = kinds[-1][0]  # where compressed nodes passed over go back
        try:
            for index, kept in kinds:
                while (node := index.pop()) is not None:
                    if not holds(node, kept):
                        continue
                    if node in spared:
                        back.append((node, kept))
                    elif not kept and node.children:
                        inner.append(node)
                    else:
                        back.append((node, kept))
                        if drop(node, kept):
                            return
            for node in inner:
                if holds(node, False) and drop(node, False):
                    return
        finally:
            for node, kept in [*back, *((n, False) for n in inner)]:
                if node.parent is not None and holds(node, kept):
                    (self.encoded if kept else home).add(node)
