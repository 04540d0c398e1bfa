"""Plan once, run many: the small integer tables the kernels read, built from a stream's calibration.

A :class:`StreamPlan` describes one stream (K or V) of one calibration on one device: the coded groups of
its bit allocation (``start``, ``size``, ``bits``, ``kind``), which group each component belongs to, and,
per token count ``T``, where each group's bytes start in the payload. Payload layout: see
:mod:`kvtc_sglang.codec.quant` (the Triton and torch paths write the same bytes).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..codec.allocation import INT_KINDS, KIND_BITS, Allocation
from ..codec.quant import group_nbytes, payload_nbytes

KIND_DROP, KIND_INT, KIND_FP8 = 0, 1, 2
_MAX_CACHED_T = 256  # token counts whose offset tables are kept per plan


@dataclass(frozen=True)
class GroupClass:
    """Coded groups of one kind (``int2``/``int4``/``int8``/``fp8``): one kernel launch each."""

    kind: str
    bits: int
    group_ids: torch.Tensor  # [G_c] int32: indices into the plan's group tables
    max_size: int  # largest group size of this class


@dataclass(frozen=True)
class StreamPlan:
    """Integer tables of one stream's bit allocation on one device.

    Attributes:
        rank: ``R``, components that carry bits (the basis has ``R`` columns).
        group_start, group_size, group_bits, group_kind: ``[G]`` int32, coded groups in payload order.
        comp_group: ``[R]`` int32, the coded group of each component, ``-1`` for dropped components.
        classes: the groups split by kind, for the quantize-and-pack launches.
        alloc: the allocation the tables were built from (payload sizes come from it).
    """

    rank: int
    group_start: torch.Tensor
    group_size: torch.Tensor
    group_bits: torch.Tensor
    group_kind: torch.Tensor
    comp_group: torch.Tensor
    classes: tuple[GroupClass, ...]
    alloc: Allocation
    _offsets: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, alloc: Allocation, device: torch.device) -> StreamPlan:
        groups = alloc.coded_groups()
        rank = alloc.rank
        comp_group = torch.full((rank,), -1, dtype=torch.int32)
        for gi, g in enumerate(groups):
            comp_group[g.start : g.start + g.size] = gi
        classes = []
        for kind in (*INT_KINDS, "fp8"):
            ids = [gi for gi, g in enumerate(groups) if g.kind == kind]
            if ids:
                max_size = max(groups[gi].size for gi in ids)
                classes.append(
                    GroupClass(kind, KIND_BITS[kind], torch.tensor(ids, dtype=torch.int32, device=device), max_size)
                )

        def col(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        return cls(
            rank=rank,
            group_start=col([g.start for g in groups]),
            group_size=col([g.size for g in groups]),
            group_bits=col([KIND_BITS[g.kind] for g in groups]),
            group_kind=col([KIND_FP8 if g.kind == "fp8" else KIND_INT for g in groups]),
            comp_group=comp_group.to(device),
            classes=tuple(classes),
            alloc=alloc,
        )

    def nbytes(self, num_tokens: int) -> int:
        """Payload bytes of this stream for ``num_tokens`` tokens."""
        return payload_nbytes(self.alloc, num_tokens)

    def group_offsets(self, num_tokens: int) -> torch.Tensor:
        """``[G + 1]`` int64 byte offsets of each group in the payload for ``num_tokens`` tokens (cached)."""
        cached = self._offsets.get(num_tokens)
        if cached is None:
            if len(self._offsets) >= _MAX_CACHED_T:
                self._offsets.pop(next(iter(self._offsets)))
            sizes = [group_nbytes(g, num_tokens) for g in self.alloc.coded_groups()]
            offsets = [0, *itertools.accumulate(sizes)]
            cached = torch.tensor(offsets, dtype=torch.int64, device=self.group_start.device)
            self._offsets[num_tokens] = cached
        return cached
