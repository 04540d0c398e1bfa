"""Fused encode, part 1: gather rows from the KV pool, remove RoPE, centre, project on the PCA basis.

``coeffs [T, R] = (unrope(pool[l][slots, h, :]) for every l, h  - mean) @ basis``, computed per
(token block, component block) program with ``tl.dot`` and fp32 accumulation; no ``[T, F]`` copy of the
K/V is ever made. The quantize-and-pack kernel (:mod:`.quant_pack`) turns the coefficients into bytes.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .common import (
    LayerTable,
    RopeTables,
    Tiles,
    check_precision,
    check_tensor,
    head_dims,
    launch_device,
    rope_args,
    rotate_ref,
    tiles,
)
from .meta import PoolGeometry, RopeGeometry, geometry_constexprs

PROJECT_TILES = {"cuda": Tiles(block_t=64, block_r=64), "interpreter": Tiles(block_t=128, block_r=256)}
# Warps of a compiled launch (the interpreter ignores them): with 4, the 64 x 64 tile spilled 230-850 bytes
# per thread at head_dim 64 on sm_90 and sm_100, with 8 at most 44 (92 with partial rotary; head_dim 128
# still spills up to 1 KB: BENCHMARKS.md, benchmarks/aot_compile.py).
PROJECT_NUM_WARPS = 8


@triton.jit
def _project_kernel(
    # pointers
    layer_ptrs, slots_ptr, cos_ptr, sin_ptr, mean_ptr, basis_ptr, out_ptr,
    # sizes
    num_tokens, rank,
    # strides
    row_stride, rope_stride,
    # meta-parameters: geometry, then tiling
    L: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, REST_P: tl.constexpr,
    ROTATE: tl.constexpr, GPTJ: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Coefficients ``out[t, r]``, tokens ``[pid0 * BLOCK_T, +BLOCK_T)``, components ``[pid1 * BLOCK_R, +BLOCK_R)``.

    layer_ptrs ``[L]`` int64 addresses of ``[N, H, D]`` ``DTYPE`` buffers (rows ``row_stride`` apart);
    slots ``[T]`` int64; cos, sin ``[L', T, HALF]`` fp32 (layer stride ``rope_stride``, 0 when shared;
    read only if ``ROTATE``); mean ``[F]`` fp32; basis ``[F, R]`` fp32 row-major; out ``[T, R]`` fp32.
    Grid ``(cdiv(T, BLOCK_T), cdiv(R, BLOCK_R))``.
    """
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    t_ok = t < num_tokens
    r_ok = r < rank
    rows = tl.load(slots_ptr + t, mask=t_ok, other=0).to(tl.int64) * row_stride  # [BT]
    dim_a, dim_b, dim_c, d_ok = head_dims(HALF, HALF_P, REST_P, GPTJ)
    c_ok = dim_c < D
    cs_off = t[:, None] * HALF + tl.arange(0, HALF_P)[None, :]
    cs_mask = t_ok[:, None] & d_ok[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for layer in range(L):
        base = tl.load(layer_ptrs + layer).to(tl.pointer_type(DTYPE))
        if ROTATE:  # rope_stride is 0 when every layer shares one RoPE
            cos = tl.load(cos_ptr + layer * rope_stride + cs_off, mask=cs_mask, other=0.0)  # [BT, HALF_P]
            sin = tl.load(sin_ptr + layer * rope_stride + cs_off, mask=cs_mask, other=0.0)
        for h in range(H):
            f0 = (layer * H + h) * D  # feature index of this head's dim 0
            head = base + rows[:, None] + h * D
            m_a = t_ok[:, None] & d_ok[None, :]
            xa = tl.load(head + dim_a[None, :], mask=m_a, other=0.0).to(tl.float32)  # [BT, HALF_P]
            xb = tl.load(head + dim_b[None, :], mask=m_a, other=0.0).to(tl.float32)
            if ROTATE:  # remove RoPE: rotate by -angle
                ya = xa * cos - xb * (-sin)
                yb = xb * cos + xa * (-sin)
            else:
                ya = xa
                yb = xb
            ya = ya - tl.load(mean_ptr + f0 + dim_a, mask=d_ok, other=0.0)[None, :]
            yb = yb - tl.load(mean_ptr + f0 + dim_b, mask=d_ok, other=0.0)[None, :]
            b_mask = d_ok[:, None] & r_ok[None, :]
            ba = tl.load(basis_ptr + (f0 + dim_a)[:, None].to(tl.int64) * rank + r[None, :], mask=b_mask, other=0.0)
            bb = tl.load(basis_ptr + (f0 + dim_b)[:, None].to(tl.int64) * rank + r[None, :], mask=b_mask, other=0.0)
            acc = tl.dot(tl.where(m_a, ya, 0.0), ba, acc, input_precision=PRECISION)
            acc = tl.dot(tl.where(m_a, yb, 0.0), bb, acc, input_precision=PRECISION)
            if REST_P > 0:  # dims past the rotary ones: unrotated
                m_c = t_ok[:, None] & c_ok[None, :]
                xc = tl.load(head + dim_c[None, :], mask=m_c, other=0.0).to(tl.float32)
                xc = xc - tl.load(mean_ptr + f0 + dim_c, mask=c_ok, other=0.0)[None, :]
                bc_mask = c_ok[:, None] & r_ok[None, :]
                bc = tl.load(
                    basis_ptr + (f0 + dim_c)[:, None].to(tl.int64) * rank + r[None, :], mask=bc_mask, other=0.0
                )
                acc = tl.dot(tl.where(m_c, xc, 0.0), bc, acc, input_precision=PRECISION)
    out = out_ptr + t[:, None].to(tl.int64) * rank + r[None, :]
    tl.store(out, acc, mask=t_ok[:, None] & r_ok[None, :])


def project_meta(pool: PoolGeometry, rope: RopeGeometry, tile: Tiles, precision: str) -> dict[str, Any]:
    """Meta-parameters :func:`project` launches ``_project_kernel`` with (also the AOT compile list's)."""
    tiling = {"BLOCK_T": tile.block_t, "BLOCK_R": tile.block_r, "PRECISION": check_precision(precision),
              "num_warps": PROJECT_NUM_WARPS}  # fmt: skip
    return {**geometry_constexprs(pool, rope), **tiling}


def project(
    table: LayerTable,
    slots: torch.Tensor,
    mean: torch.Tensor,
    basis: torch.Tensor,
    rope: RopeTables | None,
    out: torch.Tensor | None = None,
    precision: str = "ieee",
) -> torch.Tensor:
    """Coefficients of the pool rows at ``slots``.

    Args:
        table: the stream's per-layer buffers, ``L x [N, H, D]`` fp16/bf16/fp32.
        slots: ``[T]`` integer rows of the tokens to encode.
        mean: ``[F = L * H * D]`` fp32 calibration mean.
        basis: ``[F, R]`` fp32 contiguous encoding basis (per-feature scale folded in).
        rope: the keys' RoPE tables at the tokens' positions (removed before projecting); ``None`` for values.
        out: optional caller-owned ``[T, R]`` fp32 output.
        precision: ``tl.dot`` input precision, one of :data:`~.common.DOT_PRECISIONS`.

    Returns:
        ``[T, R]`` fp32 coefficients.
    """
    device = launch_device(_project_kernel, table.device)
    slots = table.check_slots(slots)
    num_t, feat = slots.numel(), table.num_features
    check_tensor(mean, (("F", feat),), torch.float32, device, "mean")
    rank = check_tensor(basis, (("F", feat), ("R", None)), torch.float32, device, "basis", contiguous=True).shape[1]
    if out is None:
        out = torch.empty(num_t, rank, dtype=torch.float32, device=device)
    check_tensor(out, (("T", num_t), ("R", rank)), torch.float32, device, "out", contiguous=True)
    ra = rope_args(rope, table, num_t, placeholder=mean)
    precision = check_precision(precision)
    if num_t == 0 or rank == 0:
        return out
    tile = tiles(PROJECT_TILES, _project_kernel)
    grid = (triton.cdiv(num_t, tile.block_t), triton.cdiv(rank, tile.block_r))
    _project_kernel[grid](
        table.ptrs, slots, ra.cos, ra.sin, mean, basis, out,
        num_t, rank,
        table.row_stride, ra.stride,
        **project_meta(table, ra, tile, precision),
    )  # fmt: skip
    return out


def project_ref(
    buffers: list[torch.Tensor],
    slots: torch.Tensor,
    mean: torch.Tensor,
    basis: torch.Tensor,
    rope: RopeTables | None,
) -> torch.Tensor:
    """Plain-torch :func:`project`: gather ``[L, T, H, D]``, remove RoPE, ``[T, F] - mean`` then ``@ basis``."""
    x = torch.stack([b.index_select(0, slots.to(b.device)) for b in buffers])  # [L, T, H, D]
    if rope is not None:
        x = rotate_ref(x, rope, -1.0)
    num_t = x.shape[1]
    feats = x.to(torch.float32).permute(1, 0, 2, 3).reshape(num_t, -1)  # [T, F]
    return (feats - mean) @ basis
