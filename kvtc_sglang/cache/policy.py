"""The order of things (like SGLang's ``EvictionStrategy``): what to compress first, which blobs give way
when the store needs room or the pool needs slots, and the steps ``evict`` takes. No tree changes here."""

from __future__ import annotations

from collections.abc import Iterable

from .config import KVTCCacheConfig
from .tree_walk import TreeNode, compress_candidates


class CompressionPolicy:
    """Least-recently-used everywhere; kept blobs of device nodes go before compressed nodes (dropping them
    loses no cached KV), compressed leaves before compressed inner nodes.

    ``evict`` steps, in order, each only while slots are still short:
    ``compress`` (cold device nodes; frees most slots per lost precision), ``device_leaves`` (SGLang's LRU
    leaf eviction of leaves with nothing compressed below), ``store`` (drop blobs until the store gives
    pages back), ``device_with_compressed`` (leaves whose compressed children go with them).
    """

    evict_steps = ("compress", "device_leaves", "store", "device_with_compressed")

    def __init__(self, config: KVTCCacheConfig, page_size: int) -> None:
        ps = page_size
        self.page_size = ps
        self.sink_end = -(-config.sink_tokens // ps) * ps
        self.window = config.window_tokens
        self.min_tokens = max(ps, config.min_tokens // ps * ps)
        self.idle_seconds = config.idle_seconds

    def compress_order(self, root: TreeNode) -> list[tuple[TreeNode, int, int, int]]:
        """``(node, start, lo, hi)``: device, unlocked nodes with a compressible span ``[lo, hi)``, LRU first."""
        return compress_candidates(root, self.sink_end, self.window, self.page_size, self.min_tokens)

    def is_idle(self, node: TreeNode, now: float) -> bool:
        return now - node.last_access_time >= self.idle_seconds

    @staticmethod
    def store_victims(
        retained: Iterable[TreeNode], compressed: Iterable[TreeNode], spared: set[TreeNode]
    ) -> list[tuple[TreeNode, bool]]:
        """Blobs to drop for room, in order: ``(node, is_kept_blob_of_a_device_node)``."""
        kept = sorted((n for n in retained if n not in spared), key=lambda n: n.last_access_time)
        comp = sorted(
            (n for n in compressed if n not in spared), key=lambda n: (len(n.children) > 0, n.last_access_time)
        )
        return [(n, True) for n in kept] + [(n, False) for n in comp]
