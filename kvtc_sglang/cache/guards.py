"""Which tree nodes the parts of :class:`~kvtc_sglang.cache.radix.KVTCRadixCache` may not touch now, and the
scheduler's tick clock they share.

:class:`NodeGuards` owns three sets that every part consults: nodes being restored (``protect``: never evicted or
dropped while a restore holds them), nodes whose rows the background encoder reads (``pending``, with the job
reading them: not freed before the encoder is done) and locked nodes whose kept blob evict dropped (``spilled``:
not encoded again until their request ends). :class:`TickClock` counts scheduler iterations: the policy's clock for
"recently under pressure" and the wanted blobs' recency (tick counts, not clocks: every rank decides alike).
"""

from __future__ import annotations

from dataclasses import dataclass

from sglang.srt.mem_cache.radix_cache import TreeNode

from .controller import EncodeJob, KVTCController
from .stats import KVTCStats

NEVER = -(1 << 30)  # the tick of an evict that never happened: the encoder sleeps


@dataclass
class TickClock:
    """Scheduler iterations seen, and the last one at which ``evict`` had to free memory."""

    ticks: int = 0
    last_evict_tick: int = NEVER

    def awake(self, window: int) -> bool:
        """An evict within ``window`` ticks: memory is the limit, the background encoder stays awake."""
        return self.ticks - self.last_evict_tick <= window

    def pressed(self) -> None:
        self.last_evict_tick = self.ticks

    def calm(self) -> None:
        """An empty cache is under no pressure."""
        self.last_evict_tick = NEVER


class NodeGuards:
    """The nodes being restored, read by the encoder, or spilled (see the module docstring).

    Args:
        ctl: the controller whose encoder :meth:`wait_pending` waits for.
        stats: counts those waits (``encoder_waits``).
    """

    def __init__(self, ctl: KVTCController, stats: KVTCStats) -> None:
        self.ctl = ctl
        self.stats = stats
        self.protect: set[TreeNode] = set()  # nodes of a path being restored
        self.pending: dict[TreeNode, EncodeJob] = {}  # nodes whose rows the encoder reads, and the job reading them
        self.spilled: set[TreeNode] = set()  # locked nodes whose kept blob evict dropped: not again while locked

    def clear(self) -> None:
        self.pending.clear()
        self.spilled.clear()

    def busy(self, node: TreeNode) -> bool:
        """Its slots may not be freed now: locked, being restored, or read by the encoder."""
        return node.lock_ref > 0 or node in self.protect or node in self.pending

    def unreadable(self, node: TreeNode) -> bool:
        """The encoder may not take it now: being restored or already read by the encoder. A locked node may
        be encoded (a running request only reads its prefix rows), so that it is instantly freeable the
        moment its request ends; but not again once evict dropped its kept blob for room (until unlocked)."""
        return node in self.protect or node in self.pending or (node.lock_ref > 0 and node in self.spilled)

    def wait_pending(self) -> None:
        """Block until the encoder has read every row it was given; results are committed at the next tick."""
        self.ctl.wait()
        self.stats.encoder_waits += 1

    def reading(self, job: EncodeJob, nodes: list[TreeNode]) -> None:
        """``job`` reads the rows of ``nodes`` from now on."""
        for node in nodes:
            self.pending[node] = job

    def done(self, job: EncodeJob) -> None:
        """``job`` finished: its nodes' rows may be freed."""
        for node in [n for n, j in self.pending.items() if j is job]:
            del self.pending[node]

    def split(self, child: TreeNode, head: TreeNode) -> None:
        """``head`` was split off ``child``: the encoder still reads its rows if it read the child's (the job is
        discarded at commit)."""
        job = self.pending.get(child)
        if job is not None:
            self.pending[head] = job

    def unlocked_path(self, node: TreeNode) -> None:
        """``node``'s path was unlocked by a request: its nodes with no lock left may be encoded again."""
        if not self.spilled:
            return
        up: TreeNode | None = node
        while up is not None and up.parent is not None:
            if up.lock_ref == 0:
                self.spilled.discard(up)
            up = up.parent
