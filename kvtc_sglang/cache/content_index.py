"""An exact content index of the token spans held by compressed KV blobs.

When a radix node is encoded, the cache asks whether its tokens (the same token ids, so the same text)
already sit in a span held by some blob, at any offset: the same text reached through another prefix is
rarely page-aligned the same way, so the index must tolerate any misalignment.

Stride/probe argument: each owner's tokens are hashed only in windows of ``window`` tokens starting at
multiples of ``window`` (one dict entry per ``window`` tokens), while ``find`` hashes the query's window at
every position. A common run of ``L >= 2*window - 1`` tokens starting at owner position ``t`` contains an
aligned owner position ``p`` in ``[t, t + window)`` with ``p + window <= t + L``, so the query window
opposite ``p`` hits an indexed window whatever the phase; shorter runs (of at least ``min_tokens``) are found
only when their phase allows. Every hit is compared token by token, so hash collisions never make a match,
and is extended left and right to the longest common run. A query costs one hash per position plus the hits;
highly repetitive text (many windows in one bucket) costs more, as every hit is checked exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

MAX_BUCKET = 8  # owner windows kept per bucket: repetitive text (a run of one token) cannot fill a bucket
MAX_CHECKS = 20_000  # candidate windows compared per ``find``: bounded work on the scheduler thread


def _hash(window: tuple[int, ...]) -> int:
    """Bucket key of one window of tokens (a seam for tests that force collisions)."""
    return hash(window)


@dataclass(frozen=True)
class SpanMatch:
    """``length`` tokens of the query from ``start`` equal the owner's tokens from ``owner_start``."""

    start: int
    owner: Hashable
    owner_start: int
    length: int


class ContentIndex:
    """Owners' token sequences, found again by any run of at least ``min_tokens`` common tokens."""

    def __init__(self, window: int = 32, min_tokens: int = 128, *, max_bucket: int | None = MAX_BUCKET,
                 max_checks: int | None = MAX_CHECKS) -> None:  # fmt: skip
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if min_tokens < window:
            raise ValueError(f"min_tokens must be >= window ({window}), got {min_tokens}")
        self.window = window
        self.min_tokens = min_tokens
        self._tokens: dict[Hashable, tuple[int, ...]] = {}
        self._rank: dict[Hashable, int] = {}  # owner -> order of addition (ties go to the earliest)
        self._buckets: dict[int, list[tuple[Hashable, int]]] = {}  # window key -> (owner, aligned position)
        self._added = itertools.count()
        self.max_bucket = max_bucket  # None: unbounded (exhaustive; tests)
        self.max_checks = max_checks
        self._checks = 0  # what is left of one find's budget
        self.last_checks = 0  # candidates the last find compared

    def __contains__(self, owner: object) -> bool:
        return owner in self._tokens

    def __len__(self) -> int:
        return len(self._tokens)

    def tokens_of(self, owner: Hashable) -> tuple[int, ...]:
        """The tokens ``owner`` was indexed with (KeyError if it is not indexed)."""
        return self._tokens[owner]

    def _key(self, tokens: tuple[int, ...], pos: int) -> int:
        return _hash(tokens[pos : pos + self.window])

    def _keys(self, tokens: tuple[int, ...]) -> list[tuple[int, int]]:
        """``(key, position)`` of every aligned window of ``tokens``."""
        return [(self._key(tokens, p), p) for p in range(0, len(tokens) - self.window + 1, self.window)]

    def add(self, owner: Hashable, tokens: Sequence[int]) -> None:
        """Index ``tokens`` under ``owner``; sequences shorter than ``min_tokens`` are not indexed."""
        if owner in self._tokens:
            raise ValueError(f"owner {owner!r} is already indexed")
        toks = tuple(tokens)
        if len(toks) < self.min_tokens:
            return
        self._tokens[owner] = toks
        self._rank[owner] = next(self._added)
        for key, pos in self._keys(toks):
            bucket = self._buckets.setdefault(key, [])
            if self.max_bucket is None or len(bucket) < self.max_bucket:  # fuller: repetitive text, nothing new
                bucket.append((owner, pos))

    def remove(self, owner: Hashable) -> None:
        """Forget ``owner`` (no-op if it is not indexed)."""
        toks = self._tokens.pop(owner, None)
        if toks is None:
            return
        del self._rank[owner]
        for key in {key for key, _ in self._keys(toks)}:
            kept = [entry for entry in self._buckets[key] if entry[0] != owner]
            if kept:
                self._buckets[key] = kept
            else:
                del self._buckets[key]

    def find(self, tokens: Sequence[int], accept: Callable[[Hashable], bool] | None = None) -> list[SpanMatch]:
        """Maximal, non-overlapping runs of >= ``min_tokens`` query tokens held by accepted owners, left to
        right: at the leftmost start with any run, the longest run (ties: the owner added first, then the
        lowest ``owner_start``); the search goes on after its end."""
        query = tuple(tokens)
        verdicts: dict[Hashable, bool] = {}

        def allowed(owner: Hashable) -> bool:
            if accept is None:
                return True
            if owner not in verdicts:
                verdicts[owner] = bool(accept(owner))
            return verdicts[owner]

        matches: list[SpanMatch] = []
        lo = 0
        budget = self.max_checks if self.max_checks is not None else 1 << 62
        self._checks = budget
        while (match := self._first(query, lo, allowed)) is not None:
            matches.append(match)
            lo = match.start + match.length
        self.last_checks = budget - max(self._checks, 0)
        return matches

    def _first(self, query: tuple[int, ...], lo: int, allowed: Callable[[Hashable], bool]) -> SpanMatch | None:
        """The chosen run starting at or after ``lo`` with the leftmost start, or None."""
        w, n = self.window, len(query)
        best: tuple[int, int, int, int] | None = None  # (start, -length, rank, owner_start): lowest wins
        best_owner: Hashable = None
        seen: dict[tuple[Hashable, int], int] = {}  # (owner, diagonal) -> end of the run extended there
        q = lo
        # A run of >= 2w-1 tokens starting at s is probed at some q <= s + w - 1: past best's start + w - 1,
        # no run can start earlier than best's or tie it.
        while q + w <= n and (best is None or q < best[0] + w):
            for owner, pos in self._buckets.get(_hash(query[q : q + w]), ()):
                self._checks -= 1
                if self._checks < 0:
                    break  # the budget is spent: report what was found (every match reported is exact)
                diagonal, toks = (owner, pos - q), self._tokens[owner]
                if seen.get(diagonal, -1) >= q + w or not allowed(owner) or query[q : q + w] != toks[pos : pos + w]:
                    continue  # inside a run already extended, refused, or a hash collision
                start, owner_start = q, pos
                while start > lo and owner_start > 0 and query[start - 1] == toks[owner_start - 1]:
                    start, owner_start = start - 1, owner_start - 1
                rank, longest = self._rank[owner], min(n - start, len(toks) - owner_start)
                if longest < self.min_tokens or (best is not None and (start, -longest, rank, owner_start) >= best):
                    continue  # cannot make a run long enough to beat the best one
                end = _common_end(query, q + w, toks, pos + w)
                seen[diagonal] = end
                cand = (start, start - end, rank, owner_start)
                if end - start >= self.min_tokens and (best is None or cand < best):
                    best, best_owner = cand, owner
            q += 1
            if self._checks < 0:
                break
        if best is None:
            return None
        return SpanMatch(start=best[0], owner=best_owner, owner_start=best[3], length=-best[1])


def _common_end(a: tuple[int, ...], i: int, b: tuple[int, ...], j: int, chunk: int = 16) -> int:
    """The end in ``a`` of the common run of ``a[i:]`` and ``b[j:]`` (compared a chunk at a time, then token
    by token)."""
    while i + chunk <= len(a) and j + chunk <= len(b) and a[i : i + chunk] == b[j : j + chunk]:
        i, j = i + chunk, j + chunk
    while i < len(a) and j < len(b) and a[i] == b[j]:
        i, j = i + 1, j + 1
    return i
