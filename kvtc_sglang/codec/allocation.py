"""Bit allocation data types: which principal components get how many bits.

An :class:`Allocation` splits the ordered components ``[0, R)`` into consecutive :class:`Group` s.
Each group has a size from :data:`GROUP_SIZES` and a :class:`~kvtc_sglang.payload_format.GroupKind`
(stored in the artifact as its string value):

* ``drop``: 0 bits, the component is reconstructed as the calibration mean (implicit truncation);
* ``int2`` / ``int4`` / ``int8``: uniform asymmetric quantization per token per group; every token pays
  :data:`INT_OVERHEAD_BITS` for its fp16 minimum and fp16 step;
* ``fp8``: float8 e4m3 after dividing by a per-component scale fixed at calibration (no per-token
  overhead), which suits the high-variance leading components.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..payload_format import INT_OVERHEAD_BITS, GroupKind

GROUP_SIZES: tuple[int, ...] = (1, 16, 64, 256, 1024)
# The artifact stores kinds as strings; GroupKind (a StrEnum) compares and hashes equal to them.
KIND_BITS: dict[str, int] = {k.value: k.bits for k in GroupKind}
INT_KINDS: tuple[str, ...] = tuple(k.value for k in GroupKind if k.is_int)


@dataclass(frozen=True)
class Group:
    """Components ``[start, start + size)`` coded as ``kind``."""

    start: int
    size: int
    kind: GroupKind  # a plain string such as "int4" is converted

    def __post_init__(self) -> None:
        if self.kind not in KIND_BITS:
            raise ValueError(f"group kind must be one of {sorted(KIND_BITS)}, got {self.kind!r}")
        object.__setattr__(self, "kind", GroupKind(self.kind))
        if self.size <= 0 or self.start < 0:
            raise ValueError(f"group needs start >= 0 and size > 0, got {self.start}, {self.size}")

    @property
    def bits(self) -> int:
        """Bits per token this group costs, overhead included."""
        return group_bits(self.size, self.kind)


def group_bits(size: int, kind: GroupKind | str) -> int:
    """Bits per token of a group of ``size`` components coded as ``kind``."""
    kind = GroupKind(kind)
    return size * kind.bits + (INT_OVERHEAD_BITS if kind.is_int else 0)


@dataclass(frozen=True)
class Allocation:
    """Consecutive groups covering components ``[0, rank)``; components past ``rank`` are dropped."""

    groups: tuple[Group, ...]

    def __post_init__(self) -> None:
        pos = 0
        for g in self.groups:
            if g.start != pos:
                raise ValueError(f"groups must be consecutive: expected start {pos}, got {g.start}")
            pos += g.size

    @property
    def rank(self) -> int:
        """Number of components that receive bits (the basis is stored up to here)."""
        coded = [g.start + g.size for g in self.groups if g.kind != "drop"]
        return max(coded, default=0)

    @property
    def bits_per_token(self) -> int:
        return sum(g.bits for g in self.groups)

    def coded_groups(self) -> tuple[Group, ...]:
        """The groups that carry bits, in order."""
        return tuple(g for g in self.groups if g.kind != "drop")

    def to_json(self) -> list[list[int | str]]:
        return [[g.start, g.size, g.kind.value] for g in self.groups]

    @classmethod
    def from_json(cls, rows: list[list[int | str]]) -> Allocation:
        if not isinstance(rows, list):
            raise ValueError(f"allocation must be a list of [start, size, kind], got {type(rows).__name__}")
        groups = []
        for row in rows:
            if not (isinstance(row, list) and len(row) == 3):
                raise ValueError(f"allocation row must be [start, size, kind], got {row!r}")
            start, size, kind = row
            if not (isinstance(start, int) and isinstance(size, int) and isinstance(kind, str)):
                raise ValueError(f"allocation row must be [int, int, str], got {row!r}")
            if kind not in KIND_BITS:
                raise ValueError(f"group kind must be one of {sorted(KIND_BITS)}, got {kind!r}")
            groups.append(Group(start, size, GroupKind(kind)))
        return cls(tuple(groups))

    def summary(self) -> str:
        """A compact text form such as ``8x1:fp8 2x16:int4 ...`` for reports."""
        parts: list[str] = []
        for g in self.coded_groups():
            label = f"{g.size}:{g.kind}"
            if parts and parts[-1].split("x", 1)[1] == label:
                n = int(parts[-1].split("x", 1)[0]) + 1
                parts[-1] = f"{n}x{label}"
            else:
                parts.append(f"1x{label}")
        return " ".join(parts) + f" | rank {self.rank}, {self.bits_per_token} bits/token"
