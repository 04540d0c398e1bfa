"""Plan once, run many: the small integer tables the kernels read, built from a stream's coded groups.

A :class:`StreamPlan` describes one stream (K or V) of one calibration on one device: its coded groups
(``start``, ``size``, ``bits``, ``kind``), which group each component belongs to, and, per token count
``T``, where each group's bytes start in the payload. Payload layout: :mod:`kvtc_sglang.payload_format`
(the Triton and torch paths write the same bytes). Kinds are :class:`GroupKind` values; the tables hold
their :attr:`GroupKind.code`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..devcopy import tensor_on
from ..payload_format import GroupKind, group_nbytes

_MAX_CACHED_T = 256  # token counts whose offset tables are kept per plan
_LOCK = threading.Lock()  # the offset caches are shared by the encode worker and the scheduler thread


class CodedGroup(Protocol):
    """What the plan needs of a group (the codec's ``Group`` has it): components ``[start, start + size)``."""

    @property
    def start(self) -> int: ...
    @property
    def size(self) -> int: ...
    @property
    def kind(self) -> GroupKind: ...


@dataclass(frozen=True)
class GroupClass:
    """Coded groups of one kind (``int2``/``int4``/``int8``/``fp8``): one quantize-and-pack launch each."""

    kind: GroupKind
    group_ids: torch.Tensor  # [G_c] int32: indices into the plan's group tables
    max_size: int  # largest group size of this class


@dataclass(frozen=True)
class StreamPlan:
    """Integer tables of one stream's coded groups on one device.

    Attributes:
        rank: ``R``, components that carry bits (the basis has ``R`` columns).
        group_start, group_size, group_bits, group_kind: ``[G]`` int32, coded groups in payload order
            (``group_kind`` holds :attr:`GroupKind.code`).
        comp_group: ``[R]`` int32, the coded group of each component, ``-1`` for dropped components.
        classes: the groups split by kind, for the quantize-and-pack launches.
        spans: ``(start, size, kind)`` of each coded group, on the host (payload sizes come from them).
    """

    rank: int
    group_start: torch.Tensor
    group_size: torch.Tensor
    group_bits: torch.Tensor
    group_kind: torch.Tensor
    comp_group: torch.Tensor
    classes: tuple[GroupClass, ...]
    spans: tuple[tuple[int, int, GroupKind], ...]
    _offsets: dict[int, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, groups: Sequence[CodedGroup], rank: int, device: torch.device) -> StreamPlan:
        """Tables of the coded (non-drop) ``groups``, in payload order, of a stream of ``rank`` components."""
        groups = [g for g in groups if g.kind is not GroupKind.DROP]
        for g in groups:
            if g.start < 0 or g.start + g.size > rank:
                raise ValueError(f"group [{g.start}, {g.start + g.size}) lies outside the rank {rank}")
        comp_group = torch.full((rank,), -1, dtype=torch.int32)
        for gi, g in enumerate(groups):
            comp_group[g.start : g.start + g.size] = gi
        classes = []
        for kind in GroupKind:
            ids = [gi for gi, g in enumerate(groups) if g.kind is kind]
            if ids:
                max_size = max(groups[gi].size for gi in ids)
                classes.append(GroupClass(kind, torch.tensor(ids, dtype=torch.int32, device=device), max_size))

        def col(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        return cls(
            rank=rank,
            group_start=col([g.start for g in groups]),
            group_size=col([g.size for g in groups]),
            group_bits=col([g.kind.bits for g in groups]),
            group_kind=col([g.kind.code for g in groups]),
            comp_group=comp_group.to(device),
            classes=tuple(classes),
            spans=tuple((g.start, g.size, g.kind) for g in groups),
        )

    @property
    def device(self) -> torch.device:
        return self.group_start.device

    def nbytes(self, num_tokens: int) -> int:
        """Payload bytes of this stream for ``num_tokens`` tokens."""
        return sum(group_nbytes(size, kind, num_tokens) for _, size, kind in self.spans)

    def group_offsets(self, num_tokens: int) -> torch.Tensor:
        """``[G + 1]`` int64 byte offsets of each group in the payload for ``num_tokens`` tokens (cached; safe from
        several threads). On CUDA the table is copied without a host wait, and marked as used by the calling
        stream each time it is handed out: the cache may drop it while a kernel of another stream reads it."""
        with _LOCK:
            cached = self._offsets.get(num_tokens)
            if cached is None:
                if len(self._offsets) >= _MAX_CACHED_T:
                    self._offsets.pop(next(iter(self._offsets)))
                offsets = [0, *itertools.accumulate(group_nbytes(s, k, num_tokens) for _, s, k in self.spans)]
                cached = tensor_on(offsets, torch.int64, self.device)
                self._offsets[num_tokens] = cached
        if cached.is_cuda:
            cached.record_stream(torch.cuda.current_stream(cached.device))
        return cached
