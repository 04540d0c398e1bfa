"""Meta-parameters of the kernel launches, shared by the launchers and the ahead-of-time compile list.

A launcher passes its kernel the geometry of the pool and of the RoPE split (:func:`geometry_constexprs`)
plus its tiles; :mod:`.aot` builds the same dicts from plain shapes, so the variants compiled ahead of
time are the ones the launchers run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .common import rope_layout, tl_dtype


class PoolGeometry(Protocol):
    """What the geometry meta-parameters read of a pool (a :class:`~.common.LayerTable` has it)."""

    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def head_dim(self) -> int: ...
    @property
    def dtype(self) -> torch.dtype: ...


class RopeGeometry(Protocol):
    """What they read of the RoPE split (a :class:`~.common.RopeArgs` has it)."""

    @property
    def half(self) -> int: ...
    @property
    def half_p(self) -> int: ...
    @property
    def rest_p(self) -> int: ...
    @property
    def rotate(self) -> bool: ...
    @property
    def gptj(self) -> bool: ...


@dataclass(frozen=True)
class PoolShape:
    """A pool's geometry without its buffers."""

    num_layers: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype


@dataclass(frozen=True)
class RopeSplit:
    """A RoPE split without its tables (see :func:`rope_split`)."""

    half: int
    half_p: int
    rest_p: int
    rotate: bool
    gptj: bool


def rope_split(head_dim: int, rotary_dim: int | None, gptj: bool = False) -> RopeSplit:
    """The split :func:`~.common.rope_args` makes: keys rotate ``rotary_dim`` dims, values (``None``) none."""
    rotate = rotary_dim is not None
    half, half_p, rest_p = rope_layout(rotary_dim if rotary_dim is not None else head_dim, head_dim, rotate)
    return RopeSplit(half, half_p, rest_p, rotate, gptj and rotate)


def geometry_constexprs(pool: PoolGeometry, rope: RopeGeometry) -> dict[str, Any]:
    """Geometry meta-parameters of the project and decode kernels."""
    return {
        "L": pool.num_layers,
        "H": pool.num_heads,
        "D": pool.head_dim,
        "DTYPE": tl_dtype(pool.dtype),
        "HALF": rope.half,
        "HALF_P": rope.half_p,
        "REST_P": rope.rest_p,
        "ROTATE": rope.rotate,
        "GPTJ": rope.gptj,
    }
