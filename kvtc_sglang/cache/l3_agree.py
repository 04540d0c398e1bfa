"""What the tensor-parallel ranks agree on before an L3 prefetch changes their trees (:mod:`l3_tier` calls it
at a scheduler tick): when a parked request goes back to the queue, how many of its chunks are grafted, and the
host bytes each grafted blob is charged.

Each rank fetches its own shard's objects (its keys name its rank) on its own reader threads, so when a
prefetch finishes, which objects pass their checks, how a chunk is cut into segments (whoever wrote it) and a
blob's size are rank-local. The trees stay mirrored only if every rank releases the same requests on the same
tick and grafts the same segments with the same charges: a request is released once every rank has its result
(each rank's deadline bounds that wait), with the chunks that passed on every rank and are cut alike (a hash of
their segments' kinds and positions, compared as MAX and MIN); charges are the MAX over the ranks of each blob's
size (as the store's blocks are). One rank agrees with itself without a collective.
"""

from __future__ import annotations

import hashlib

from .ranks import DIGEST_BITS, LocalAgreement

NOT_DONE = -1


def layout_hash(chunk: list[tuple]) -> int:
    """A stable hash in ``[0, 2**62)`` of one chunk's segments (``(kind, lo, hi, ...)`` each)."""
    text = ";".join(f"{kind},{lo},{hi}" for kind, lo, hi, *_ in chunk).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << DIGEST_BITS) - 1)


def agree_prefetches(agreement: LocalAgreement, parked: list[tuple[int, list[list[tuple]] | None]]) -> list[int]:
    """Per parked request (every rank passes them in the same order): ``(keys asked, this rank's checked chunks,
    each a list of segments, or None while its prefetch runs)``. Returns per request the number of leading chunks
    every rank grafts alike, or ``NOT_DONE`` while any rank still waits for its result."""
    if agreement.tp_size == 1:
        return [NOT_DONE if chunks is None else len(chunks) for _, chunks in parked]
    values: list[int] = []
    for asked, chunks in parked:
        hashes = [layout_hash(c) for c in chunks or []][:asked]
        row = [int(chunks is None)] + hashes + [NOT_DONE] * (asked - len(hashes))
        values += row + [-h for h in row[1:]]
    agreed = agreement.max_each(values)
    out, at = [], 0
    for asked, _ in parked:
        waiting, highs, lows = agreed[at], agreed[at + 1 : at + 1 + asked], agreed[at + 1 + asked : at + 1 + 2 * asked]
        at += 1 + 2 * asked
        if waiting:
            out.append(NOT_DONE)
            continue
        n = 0
        while n < asked and highs[n] == -lows[n] != NOT_DONE:  # every rank has chunk n, cut alike
            n += 1
        out.append(n)
    return out


def agree_charges(agreement: LocalAgreement, sizes: list[int]) -> list[int]:
    """The host bytes to charge each blob to graft: the MAX of its size over the ranks (one rank: its size)."""
    return agreement.max_each(sizes) if agreement.tp_size > 1 else list(sizes)
