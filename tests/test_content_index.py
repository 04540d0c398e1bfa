"""ContentIndex against a brute-force reference: exact runs found at any phase, verified, filtered, removed."""

from __future__ import annotations

import random
from collections.abc import Hashable, Sequence

import pytest

from kvtc_sglang.cache import content_index
from kvtc_sglang.cache.content_index import ContentIndex, SpanMatch


def find_ref(
    owners: Sequence[tuple[Hashable, Sequence[int]]], query: Sequence[int], min_tokens: int
) -> list[SpanMatch]:
    """Brute force: at each query start left to right, the longest common run over every owner and owner
    position (ties: the earlier owner, then the lower position); take it if >= min_tokens and go on after it.
    Owners shorter than min_tokens are not indexed, so they are skipped."""
    owners = [(o, list(t)) for o, t in owners if len(t) >= min_tokens]
    matches: list[SpanMatch] = []
    s = 0
    while s < len(query):
        best: tuple[int, Hashable, int] | None = None
        for owner, toks in owners:
            for t in range(len(toks)):
                if toks[t] != query[s]:
                    continue
                n = 0
                while s + n < len(query) and t + n < len(toks) and query[s + n] == toks[t + n]:
                    n += 1
                if n >= min_tokens and (best is None or n > best[0]):
                    best = (n, owner, t)
        if best is None:
            s += 1
        else:
            matches.append(SpanMatch(start=s, owner=best[1], owner_start=best[2], length=best[0]))
            s += best[0]
    return matches


def _noise(rng: random.Random, n: int, vocab: int = 50_000) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def _build(rng: random.Random, pieces: list[list[int]]) -> list[int]:
    """The pieces in random order, with random noise (possibly none) between them."""
    pieces = pieces[:]
    rng.shuffle(pieces)
    out = _noise(rng, rng.randrange(0, 40))
    for piece in pieces:
        out += piece + _noise(rng, rng.randrange(0, 40))
    return out


def _index(owners: list[tuple[Hashable, list[int]]], window: int, min_tokens: int, bounded: bool = False
           ) -> ContentIndex:
    """An index of ``owners``: exhaustive (the brute-force reference's equal), or with the default work bounds."""
    caps = {} if bounded else {"max_bucket": None, "max_checks": None}
    index = ContentIndex(window=window, min_tokens=min_tokens, **caps)
    for owner, toks in owners:
        index.add(owner, toks)
    return index


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("window", "min_tokens"), [(4, 7), (8, 15), (8, 40), (32, 128)])
def test_matches_reference_on_planted_runs(seed: int, window: int, min_tokens: int) -> None:
    rng = random.Random(seed * 1000 + window * 10 + min_tokens)
    runs = [_noise(rng, n) for n in (1, 7, 97, 1000 + rng.randrange(300), min_tokens, rng.randrange(20, 400))]

    def pick() -> list[list[int]]:
        """Some runs, some cut to a random sub-run (different phases and lengths in different owners)."""
        chosen = []
        for run in runs:
            if rng.random() < 0.6:
                a = rng.randrange(0, max(1, len(run) // 3))
                b = len(run) - rng.randrange(0, max(1, len(run) // 3))
                chosen.append(run[a:b] if rng.random() < 0.5 else run)
        return chosen

    owners: list[tuple[Hashable, list[int]]] = [(f"o{i}", _build(rng, pick())) for i in range(5)]
    owners[1][1].extend(runs[3][rng.randrange(1, window + 1) :])  # the long run at an odd phase, for sure
    owners.append(("dup", owners[0][1][:]))  # same content as o0: ties go to o0
    query = _build(rng, [*pick(), *pick(), runs[3]])
    index = _index(owners, window, min_tokens)
    expected = find_ref(owners, query, min_tokens)
    assert any(m.length >= 900 for m in expected)
    assert index.find(query) == expected


@pytest.mark.parametrize("seed", range(4))
def test_matches_reference_on_a_tiny_vocabulary(seed: int) -> None:
    """Many accidental runs, repeated windows and ties: the greedy choice still matches the reference."""
    rng = random.Random(seed)
    owners: list[tuple[Hashable, list[int]]] = [(i, _noise(rng, rng.randrange(60, 160), vocab=3)) for i in range(3)]
    query = _noise(rng, 200, vocab=3)
    index = _index(owners, 2, 3)
    expected = find_ref(owners, query, 3)
    assert expected
    assert index.find(query) == expected


@pytest.mark.parametrize("phase", range(8))
def test_run_of_two_windows_minus_one_found_at_every_phase(phase: int) -> None:
    rng = random.Random(phase)
    window, run = 8, 15
    owner_toks = _noise(rng, 64)
    query = _noise(rng, 5) + owner_toks[phase : phase + run] + _noise(rng, 5)
    index = _index([("a", owner_toks)], window, run)
    assert index.find(query) == [SpanMatch(start=5, owner="a", owner_start=phase, length=run)]


def test_min_tokens_boundary() -> None:
    rng = random.Random(1)
    owner_toks = _noise(rng, 400)
    index = _index([("a", owner_toks)], 16, 100)
    exact = _noise(rng, 10) + owner_toks[37:137] + _noise(rng, 10)
    short = _noise(rng, 10) + owner_toks[37:136] + _noise(rng, 10)
    assert index.find(exact) == [SpanMatch(start=10, owner="a", owner_start=37, length=100)]
    assert index.find(short) == []


def test_short_owner_not_indexed() -> None:
    index = ContentIndex(window=4, min_tokens=10)
    index.add("short", list(range(9)))
    assert "short" not in index
    assert len(index) == 0
    index.add("short", list(range(10)))  # not indexed before, so no duplicate error
    assert "short" in index
    assert index.tokens_of("short") == tuple(range(10))


def test_remove_then_find_skips_owner() -> None:
    rng = random.Random(2)
    shared = _noise(rng, 300)
    a, b = _noise(rng, 50) + shared, shared + _noise(rng, 20)
    index = _index([("a", a), ("b", b)], 8, 32)
    assert [m.owner for m in index.find(shared)] == ["a"]
    index.remove("a")
    index.remove("a")  # no-op
    assert "a" not in index and len(index) == 1
    assert index.find(shared) == [SpanMatch(start=0, owner="b", owner_start=0, length=300)]
    index.remove("b")
    assert index.find(shared) == []
    assert not index._buckets
    index.add("rep", [7] * 64 + shared)  # repeated windows share a bucket
    index.remove("rep")
    assert not index._buckets and len(index) == 0


def test_accept_filter() -> None:
    rng = random.Random(3)
    shared = _noise(rng, 200)
    owners: list[tuple[Hashable, list[int]]] = [("a", shared + _noise(rng, 30)), ("b", _noise(rng, 7) + shared)]
    index = _index(owners, 8, 32)
    query = _noise(rng, 11) + shared
    assert index.find(query) == [SpanMatch(start=11, owner="a", owner_start=0, length=200)]
    assert index.find(query, accept=lambda o: o != "a") == [SpanMatch(start=11, owner="b", owner_start=7, length=200)]
    assert index.find(query, accept=lambda o: False) == []


def test_hash_collisions_never_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every window in one bucket: candidates whose tokens differ must be rejected, so the run starts
    after the changed first window, not at the colliding probe."""
    monkeypatch.setattr(content_index, "_hash", lambda window: 0)
    rng = random.Random(4)
    window = 8
    owner_toks = _noise(rng, 300)
    query = [t + 1 for t in owner_toks[:window]] + owner_toks[window:]
    other = _noise(rng, 300)
    owners: list[tuple[Hashable, list[int]]] = [("other", other), ("a", owner_toks)]
    index = _index(owners, window, 2 * window - 1)
    assert len(index._buckets) == 1
    expected = [SpanMatch(start=window, owner="a", owner_start=window, length=300 - window)]
    assert index.find(query) == expected == find_ref(owners, query, 2 * window - 1)
    assert index.find(_noise(rng, 300)) == []


def test_bad_arguments_name_values() -> None:
    with pytest.raises(ValueError, match=r"window must be >= 1, got 0"):
        ContentIndex(window=0, min_tokens=4)
    with pytest.raises(ValueError, match=r"min_tokens must be >= window \(32\), got 31"):
        ContentIndex(window=32, min_tokens=31)
    index = ContentIndex(window=4, min_tokens=8)
    index.add("a", list(range(20)))
    with pytest.raises(ValueError, match=r"owner 'a' is already indexed"):
        index.add("a", list(range(30)))
    assert index.tokens_of("a") == tuple(range(20))


def test_large_query_does_linear_work() -> None:
    """4,096 query tokens against ~100k indexed tokens: about one candidate per query position, not an O(n*m) scan
    (counted, not timed)."""
    rng = random.Random(5)
    owners: list[tuple[Hashable, list[int]]] = [(i, _noise(rng, 1000)) for i in range(100)]
    index = _index(owners, 32, 128, bounded=True)
    query = _noise(rng, 500) + owners[17][1][123:1000] + _noise(rng, 300) + owners[60][1][5:905]
    query += _noise(rng, 4096 - len(query))
    found = index.find(query)
    assert found == [
        SpanMatch(start=500, owner=17, owner_start=123, length=877),
        SpanMatch(start=1677, owner=60, owner_start=5, length=900),
    ]
    assert index.last_checks < 200, index.last_checks  # two runs, a few probes each: hits, never a bucket scan


def test_repetitive_text_is_bounded_and_never_wrong() -> None:
    """One token over and over fills one bucket: the default bounds cap the work; what is found is still exact."""
    from kvtc_sglang.cache.content_index import MAX_BUCKET, MAX_CHECKS

    owners: list[tuple[Hashable, list[int]]] = [(i, [0] * 1000) for i in range(100)]
    index = _index(owners, 32, 128, bounded=True)
    assert max(len(b) for b in index._buckets.values()) == MAX_BUCKET  # noqa: SLF001
    found = index.find([0] * 4096)
    assert index.last_checks <= MAX_CHECKS
    assert found and all(m.length >= 128 and m.start + m.length <= 4096 for m in found)
    exhaustive = _index(owners, 32, 128)
    exhaustive.find([0] * 4096)
    assert exhaustive.last_checks > MAX_CHECKS  # what the bounds save
