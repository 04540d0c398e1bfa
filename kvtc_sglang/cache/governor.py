"""Pauses encoding that is thrown away (a part of :class:`~kvtc_sglang.cache.radix.KVTCRadixCache`'s policy).

Every blob ends one of two ways: restored (useful: a prefill saved) or dropped before any restore (wasted:
an encode that competed with the forward for the same cores or GPU, for nothing). When memory is so short
that the running requests take the store's slots back before any owner returns (SGLang's agentic trace at
pool 8192 on this CPU: every one of 105k compressed tokens was dropped unused, BENCHMARKS.md), encoding
only costs. The governor compares the two outcomes, in tokens, from the cache's counters:

- once at least ``window`` tokens were wasted and they are more than ``max_waste_share`` of all outcomes,
  encoding pauses for ``pause`` busy passes (scheduler passes with a request running), and ``pause``
  doubles for the next time (``MIN_PAUSE`` .. ``MAX_PAUSE``); once ``window`` tokens were wasted at a share
  under the limit, ``pause`` is back to ``MIN_PAUSE``;
- outcomes keep arriving while paused (blobs made before it are restored or dropped); when a pause ends the
  totals since it began decide again, and with no outcomes at all encoding resumes (a probe);
- both totals halve whenever their sum exceeds ``4 * window``, so the share follows the recent past.

While paused, ``evict`` drops cold KV as SGLang's own radix cache does, and blobs already made are still
restored. Pass counts, not clocks: every rank of a tensor-parallel group decides alike.

Measured on SGLang's agentic trace on this CPU (BENCHMARKS.md): with a restore ending any pause and a 0.9
limit, 12% of the outcomes were restores, encoding hardly paused (2 pauses) and the encoder's 148 s on the two
cores made the run 1.27x vanilla's TTFT; an encode there cost ~1.75 ms/token against ~5 ms per prefilled
token, so encoding pays only above roughly a third of its tokens restored: the default limit is 0.75. Since
session 12 an encode costs 0.2-0.3 ms/token on the CPU (bf16 projections, inline): the window is
``WINDOW_POOLS`` pools, so that a run's first turns do not pause encoding that later pays.
"""

from __future__ import annotations

from .stats import KVTCStats

MIN_PAUSE = 256  # busy scheduler passes of the first pause (~1 minute of CPU decode at 8 requests)
MAX_PAUSE = 2048
# Wasted tokens before a pause, in pools: a run's first turns compress and drop one or two pools' worth before any
# owner can come back. With one pool, SGLang's agentic trace at 8192 paused for the rest of the run after its first
# turns (prefilled 114k tokens of 124k, TTFT 43.7 s); never pausing there prefilled 48k (TTFT 41.9 s), wasting 22%
# of its blob outcomes (BENCHMARKS.md, session 12).
WINDOW_POOLS = 4


class EncodeGovernor:
    """Args: ``window``: wasted tokens needed before a pause (the cache gives ``WINDOW_POOLS`` pools' worth);
    ``max_waste_share`` in (0, 1]: pause when wasted tokens exceed this share of all outcomes (1 never pauses).
    """

    def __init__(self, window: int, max_waste_share: float) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1 token, got {window}")
        if not 0.0 < max_waste_share <= 1.0:
            raise ValueError(f"max_waste_share must be in (0, 1], got {max_waste_share}")
        self.window = window
        self.max_waste_share = max_waste_share
        self._seen = (0, 0)  # the counters' (wasted, useful) totals at the last pass (they only grow)
        self.clear()

    def clear(self) -> None:
        """Forget every outcome (the cache was reset)."""
        self.wasted = 0.0  # decayed token totals since the last pause
        self.useful = 0.0
        self.clock = 0  # busy passes
        self.until = 0  # paused while clock < until
        self.pause = MIN_PAUSE

    @property
    def paused(self) -> bool:
        return self.clock < self.until

    def on_tick(self, stats: KVTCStats, busy: bool) -> None:
        """Once per scheduler pass; ``busy``: a request is running (idle passes do not advance the clock)."""
        wasted = stats.dropped_unused_tokens + stats.discarded_encoded_tokens
        useful = stats.restored_tokens
        dw, du = wasted - self._seen[0], useful - self._seen[1]
        self._seen = (wasted, useful)
        self.wasted += dw
        self.useful += du
        if self.wasted + self.useful > 4 * self.window:
            self.wasted, self.useful = self.wasted / 2, self.useful / 2
        if busy:
            self.clock += 1
        if self.paused or self.max_waste_share >= 1.0 or self.wasted < self.window:
            return
        if self.wasted <= self.max_waste_share * (self.wasted + self.useful):
            self.pause = MIN_PAUSE  # a window's worth of outcomes, mostly useful
        else:
            self.until = self.clock + self.pause
            self.pause = min(2 * self.pause, MAX_PAUSE)
            self.wasted = self.useful = 0.0
            stats.encode_pauses += 1
