"""The steps of ``evict`` in :class:`~kvtc_sglang.cache.radix.KVTCRadixCache` (the cache holds one
:class:`EvictSteps`): the policy's order over the planner's and the drops' ways of freeing slots, and the one retry
after waiting for the background encoder.

The steps (:attr:`~kvtc_sglang.cache.policy.CompressionPolicy.evict_steps` names their order): ``free_encoded``
(encoded nodes give their slots back: instant, nothing lost), ``kept_blobs`` (kept blobs of device nodes leave the
store), ``encode_inline`` (the encoder fell behind: encode cold nodes on the scheduler thread, bounded),
``device_leaves`` (SGLang's LRU over leaves with nothing compressed below), ``store`` (blobs dropped, or moved to
host memory) and ``device_with_compressed`` (leaves whose compressed children go with them)."""

from __future__ import annotations

from collections.abc import Callable

from sglang.srt.mem_cache.radix_cache import RadixCache

from .compression import CompressionPlanner
from .controller import KVTCController
from .eviction import TreeEviction
from .guards import TickClock
from .policy import CompressionPolicy
from .stats import KVTCStats


class EvictSteps:
    """Frees slots of ``tree`` for ``evict``.

    Args:
        tree: the SGLang radix tree (its allocator is read).
        planner, eviction: the compression planner and the drops, whose methods are the steps.
        policy: names the order of the steps; ``ctl`` the controller (its background encoder), ``stats`` the
            counters, ``clock`` the tick clock (an evict wakes the background encoder).
    """

    def __init__(self, tree: RadixCache, *, planner: CompressionPlanner, eviction: TreeEviction,
                 policy: CompressionPolicy, ctl: KVTCController, stats: KVTCStats,
                 clock: TickClock) -> None:  # fmt: skip
        self.tree = tree
        self.planner = planner
        self.policy = policy
        self.ctl = ctl
        self.stats = stats
        self.clock = clock
        self.steps: dict[str, Callable[[int], int]] = {
            "free_encoded": planner.free_encoded,
            "kept_blobs": lambda n: eviction.shrink_store(n, kept_only=True),
            "encode_inline": planner.encode_for_evict,
            "device_leaves": lambda n: eviction.evict_device_pass(n, keep_compressed=True),
            "store": eviction.shrink_store,
            "device_with_compressed": lambda n: eviction.evict_device_pass(n, keep_compressed=False),
        }

    def free(self, need: int) -> int:
        """Free ``need`` slots in the policy's order; returns the slots freed. Only when every step together falls
        short and the background encoder holds nodes does it wait for that encoder (counted in ``encoder_waits``),
        commit its results and go through the steps once more."""
        freed = 0
        if need > 0:
            self.clock.pressed()  # memory is the limit: the background encoder wakes up
        for _ in range(2):
            for step in self.policy.evict_steps:
                if freed >= need:
                    break
                freed += self.steps[step](need - freed)
            if freed >= need or not self.ctl.pending:
                break
            self.stats.encoder_waits += 1
            allocator = self.tree.token_to_kv_pool_allocator
            before = allocator.available_size()
            self.planner.commit(self.ctl.drain())
            need += max(0, before - allocator.available_size())  # the committed blobs took pool pages
        return freed
