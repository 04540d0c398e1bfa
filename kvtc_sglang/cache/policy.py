"""The order of things (like SGLang's ``EvictionStrategy``): what to compress first, which blobs give way
when the store needs room or the pool needs slots, and the steps ``evict`` takes. No tree changes here."""

from __future__ import annotations

import time
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

    def __init__(self, config: KVTCCacheConfig, page_size: int, reuse_candidates: bool = True) -> None:
        ps = page_size
        self.page_size = ps
        self.sink_end = -(-config.sink_tokens // ps) * ps
        self._window = config.window_tokens
        self.min_tokens = max(ps, config.min_tokens // ps * ps)
        self.idle_seconds = config.idle_seconds
        self.tree_version = 0  # bumped by the cache on every change that can add or move a candidate
        self.drops = 0  # nodes leaving the tree (a leaf gone changes its ancestors' windows)
        self._cands: list[tuple[TreeNode, int, int, int]] = []
        self._cands_version = -1
        self.reuse_candidates = reuse_candidates  # False: walk on every call (the old behaviour, for benchmarks)
        self.candidate_walks = 0
        self.candidate_seconds = 0.0

    @property
    def window(self) -> int:
        """Most recent tokens of each leaf path that are never compressed."""
        return self._window

    @window.setter
    def window(self, tokens: int) -> None:
        self._window = tokens
        self.tree_version += 1  # the listed candidates were cut with the old window

    def compress_order(self, root: TreeNode) -> list[tuple[TreeNode, int, int, int]]:
        """``(node, start, lo, hi)``: device nodes with a compressible span ``[lo, hi)``, LRU first.

        The tree is walked only when it changed since the last walk (SGLang calls ``evict`` every decode
        step under pressure, mostly on an unchanged tree); entries that went stale since (compressed,
        dropped, locked) are skipped by the caller, which re-checks each one."""
        if self._cands_version != self.tree_version or not self.reuse_candidates:
            t0 = time.perf_counter()
            self._cands = compress_candidates(root, self.sink_end, self.window, self.page_size, self.min_tokens)
            self._cands_version = self.tree_version
            self.candidate_walks += 1
            self.candidate_seconds += time.perf_counter() - t0
        return self._cands

    def keep_candidates(self, version: int, remaining: list[tuple[TreeNode, int, int, int]]) -> None:
        """The caller used listed nodes only (split, compressed) since ``version``; ``remaining`` (the entries
        it did not use, in order) stays valid for the next call. A used node's entry never does: a split
        leaves the node object as the tail, at another depth."""
        if self._cands_version == version:
            self._cands = remaining
            self._cands_version = self.tree_version

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
