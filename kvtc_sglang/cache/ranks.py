"""Agreement between the tensor-parallel ranks of one KVTC radix cache.

Under ``--tp N`` every rank mirrors the radix tree: SGLang's rank 0 broadcasts the requests each scheduler
iteration, and admission and eviction are decided locally from the tree and the pool counts, so the trees
stay equal only while every rank decides alike. kvtc's rank-local quantities are the blobs (each rank
encodes its own KV heads: sizes differ), the background encoder's progress and a restore's outcome. Each
is agreed here before the tree changes on it (HiCache all-reduces its acknowledgement counts with MIN for
the same reason, ``srt/mem_cache/unified_radix_cache.py``):

- :meth:`RankAgreement.tick`: once per scheduler iteration, unconditionally: the number of leading
  background jobs finished on *every* rank (MIN) and a digest of the decisions taken so far, compared
  across ranks (a clear ``RuntimeError`` instead of a later hang or silent drift);
- :meth:`RankAgreement.max_each` (for commits through :func:`agree_encodes`): per committed blob (and per new
  joint-encoding reference), the largest size over the ranks (the store reserves that many blocks on every rank,
  so its pages stay equal) and whether any rank failed (a miss on one rank is a miss on all).

Every call is collective: all ranks reach it at the same point of the same scheduler iteration (the tree
calls it only from decisions that are themselves mirrored). One rank (``LocalAgreement``) needs no
collective: each method is the identity. Collectives run on a dedicated gloo group on the scheduler thread.
"""

from __future__ import annotations

from typing import Any

import torch

DIGEST_BITS = 62  # digests stay in [0, 2**62): their negation fits int64 for the [d, -d] MAX trick
_MASK = (1 << DIGEST_BITS) - 1
_PRIME = 0x100000001B3  # FNV-1a 64-bit prime


class DecisionDigest:
    """A running hash of kvtc's tree decisions (what was compressed, dropped, restored or discarded, with the
    node's token count and first token); equal on every rank while the trees are mirrored."""

    def __init__(self) -> None:
        self.value = 0
        self.count = 0

    def mix(self, kind: str, num_tokens: int, first_token: int) -> None:
        h = self.value
        for part in (hash_kind(kind), num_tokens, first_token):
            h = ((h ^ (part & _MASK)) * _PRIME) & _MASK
        self.value = h
        self.count += 1

    def clear(self) -> None:
        self.value = 0
        self.count = 0


_KINDS: dict[str, int] = {}


def hash_kind(kind: str) -> int:
    """A stable small integer per decision kind (Python's ``hash`` of a str differs per process)."""
    if kind not in _KINDS:
        _KINDS[kind] = sum((i + 1) * b for i, b in enumerate(kind.encode())) + 1
    return _KINDS[kind]


class LocalAgreement:
    """One rank: nothing to agree on."""

    tp_rank = 0
    tp_size = 1
    collectives = 0

    def tick(self, finished: int, digest: DecisionDigest) -> int:
        return finished

    def max_each(self, values: list[int]) -> list[int]:
        return list(values)


class RankAgreement(LocalAgreement):
    """The ranks of one tensor-parallel group, over ``group`` (a gloo process group of exactly those ranks).

    Args:
        group: a CPU (gloo) ``torch.distributed`` process group.
        tp_rank, tp_size: this rank and the group's size.
    """

    def __init__(self, group: Any, tp_rank: int, tp_size: int) -> None:
        if tp_size < 2 or not 0 <= tp_rank < tp_size:
            raise ValueError(f"RankAgreement needs tp_size >= 2 and 0 <= tp_rank < tp_size, got {tp_rank}, {tp_size}")
        self.group = group
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self.collectives = 0

    def _all_reduce_max(self, values: list[int]) -> list[int]:
        t = torch.tensor(values, dtype=torch.int64)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=self.group)
        self.collectives += 1
        return t.tolist()

    def tick(self, finished: int, digest: DecisionDigest) -> int:
        """MIN over the ranks of ``finished``, and the digests compared: ``RuntimeError`` if they differ."""
        d = digest.value & _MASK
        out = self._all_reduce_max([-finished, d, -d, digest.count, -digest.count])
        if out[1] != -out[2] or out[3] != -out[4]:
            raise RuntimeError(
                f"kvtc: the tensor-parallel ranks' radix trees diverged: rank {self.tp_rank} has decision digest "
                f"{d:#x} after {digest.count} decisions, another rank has a different one (max {out[1]:#x}, "
                f"min {-out[2]:#x}; counts {-out[4]}..{out[3]}); kvtc took a rank-local decision"
            )
        return -out[0]

    def max_each(self, values: list[int]) -> list[int]:
        """The element-wise MAX over the ranks (every rank passes a list of the same length)."""
        if not values:
            return []
        return self._all_reduce_max(values)


def agree_encodes(agreement: LocalAgreement, jobs: list[Any]) -> list[tuple[list[int], dict[int, int]]]:
    """Per finished encode job (:class:`~kvtc_sglang.cache.controller.EncodeJob`), the size every rank reserves
    for each blob (the largest rank's) and, with joint encoding, for each new reference blob (``{target: size}``:
    the targets whose plan makes one; every rank plans alike); a job that failed on any rank loses its results on
    every rank (one collective under tensor parallelism, none on one rank)."""
    sizes = [[b.numel() for b, _ in job.results] if job.results else [0] * len(job.targets) for job in jobs]
    makes = [[i for i, plan in enumerate(job.plans) if plan is not None and plan.ref is None] for job in jobs]
    for row, job, made in zip(sizes, jobs, makes, strict=True):
        row += [job.made[i][0].numel() if job.results and i in job.made else 0 for i in made]
    failed = [0 if job.results else 1 for job in jobs]
    agreed = agreement.max_each([n for row in sizes for n in row] + failed)
    out, at = [], 0
    for row, made in zip(sizes, makes, strict=True):
        n = len(row) - len(made)
        out.append((agreed[at : at + n], dict(zip(made, agreed[at + n : at + len(row)], strict=True))))
        at += len(row)
    for job, bad in zip(jobs, agreed[at:], strict=True):
        if bad and job.results:
            job.results = []  # another rank could not encode it: nor does this one
    return out
