"""Fused decode: unpack, dequantize, project back, add the mean, re-apply RoPE, scatter into the pool.

One program per (block of tokens, layer x head): it dequantizes the block's coefficients straight from
the payload bytes (``[BLOCK_T, BLOCK_R]`` at a time), multiplies them with the decoding basis columns of
its head (``tl.dot``, fp32 accumulate) and writes the head's ``[BLOCK_T, D]`` rows into the layer's
buffer at the destination slots, in the buffer's dtype. The ``[T, F]`` K/V never exists in memory: a
restored node lands directly in the pages FlashInfer reads.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ..payload_format import GroupKind
from .common import (
    LayerTable,
    RopeTables,
    Tiles,
    check_precision,
    check_tensor,
    e4m3_bits_to_fp32,
    head_dims,
    launch_device,
    rope_args,
    rotate_ref,
    tiles,
)
from .meta import PoolGeometry, RopeGeometry, geometry_constexprs
from .plan import StreamPlan
from .quant_pack import dequant_ref

DECODE_TILES = {"cuda": Tiles(block_t=64, block_r=64), "interpreter": Tiles(block_t=128, block_r=512)}
# Warps of a compiled launch (the interpreter ignores them): with 4, the 64 x 64 tile spilled 0.2-31 KB per
# thread on sm_90 and sm_100; with 8 nothing at head_dim 64, at most 320 bytes at 128 or with partial
# rotary (BENCHMARKS.md, benchmarks/aot_compile.py).
DECODE_NUM_WARPS = 8
_FP8_CODE: tl.constexpr = tl.constexpr(GroupKind.FP8.code)


@triton.jit
def _load_fp16_bytes(ptr, mask):
    """fp32 values of the little-endian fp16 byte pairs at ``ptr`` (any shape; offsets need not be even)."""
    b0 = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    b1 = tl.load(ptr + 1, mask=mask, other=0).to(tl.int32)
    return (b0 | (b1 << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequant_tile(payload_ptr, comp_group, group_start, group_bits, group_kind, group_off, fp8_scale_ptr,
                  t, t_ok, r, r_ok, num_tokens):  # fmt: skip
    """Coefficients ``[BT, BR]`` fp32 of tokens ``t [BT]`` and components ``r [BR]`` (dropped components are 0).

    Tables as in :class:`~.plan.StreamPlan`: comp_group ``[R]``, group_start/bits/kind ``[G]`` int32,
    group_off ``[G + 1]`` int64; fp8_scale ``[R]`` fp32.
    """
    g = tl.load(comp_group + r, mask=r_ok, other=-1)  # [BR]
    coded = g >= 0
    gs = tl.where(coded, g, 0)
    start = tl.load(group_start + gs, mask=coded, other=0)
    bits = tl.load(group_bits + gs, mask=coded, other=8)
    kind = tl.load(group_kind + gs, mask=coded, other=0)  # GroupKind.code
    off = tl.load(group_off + gs, mask=coded, other=0)  # int64
    local = (r - start).to(tl.int64)  # component index inside its group
    m = t_ok[:, None] & coded[None, :]
    is_fp8 = (kind == _FP8_CODE)[None, :] & m
    is_int = (kind != _FP8_CODE)[None, :] & m  # coded and not fp8: int2/int4/int8
    t64 = t[:, None].to(tl.int64)
    # integer groups: fp16 min[T], fp16 step[T], then rows of packed codes
    lo = _load_fp16_bytes(payload_ptr + off[None, :] + 2 * t64, is_int)
    step = _load_fp16_bytes(payload_ptr + off[None, :] + 2 * num_tokens + 2 * t64, is_int)
    row_bytes = (num_tokens * bits + 7) // 8  # [BR]
    bit = t64 * bits[None, :]  # [BT, BR]
    byte_at = off[None, :] + 4 * num_tokens + local[None, :] * row_bytes[None, :] + bit // 8
    byte = tl.load(payload_ptr + byte_at, mask=is_int, other=0).to(tl.int32)
    code = (byte >> (bit % 8).to(tl.int32)) & ((1 << bits[None, :]) - 1)
    val_int = lo + code.to(tl.float32) * step
    # fp8 groups: bytes [s, T]
    f8 = tl.load(payload_ptr + off[None, :] + local[None, :] * num_tokens + t64, mask=is_fp8, other=0).to(tl.int32)
    scale = tl.load(fp8_scale_ptr + r, mask=r_ok, other=0.0)
    val_fp8 = e4m3_bits_to_fp32(f8) * scale[None, :]
    return tl.where(is_int, val_int, tl.where(is_fp8, val_fp8, 0.0))


@triton.jit
def _decode_kernel(
    # pointers
    payload_ptr, comp_group, group_start, group_bits, group_kind, group_off, fp8_scale_ptr,
    basis_ptr, mean_ptr, cos_ptr, sin_ptr, layer_ptrs, slots_ptr,
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
    """Write head ``pid1 % H`` of layer ``pid1 // H`` for tokens ``[pid0 * BLOCK_T, +BLOCK_T)``.

    payload ``[nbytes(T)]`` uint8 and the plan tables (see :func:`_dequant_tile`); basis ``[R, F]`` fp32
    row-major; mean ``[F]`` fp32; cos, sin ``[L', T, HALF]`` fp32 (layer stride ``rope_stride``; read only
    if ``ROTATE``); layer_ptrs ``[L]`` int64 addresses of ``[N, H, D]`` ``DTYPE`` buffers (rows
    ``row_stride`` apart); slots ``[T]`` int64 destination rows. Grid ``(cdiv(T, BLOCK_T), L * H)``.
    """
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    layer = tl.program_id(1) // H
    h = tl.program_id(1) % H
    f0 = (layer * H + h) * D
    dim_a, dim_b, dim_c, d_ok = head_dims(HALF, HALF_P, REST_P, GPTJ)
    c_ok = dim_c < D
    acc_a = tl.zeros((BLOCK_T, HALF_P), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_T, HALF_P), dtype=tl.float32)
    acc_c = tl.zeros((BLOCK_T, REST_P if REST_P > 0 else 16), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        r_ok = r < rank
        coef = _dequant_tile(payload_ptr, comp_group, group_start, group_bits, group_kind, group_off,
                             fp8_scale_ptr, t, t_ok, r, r_ok, num_tokens)  # fmt: skip
        rows = r[:, None].to(tl.int64) * (L * H * D)  # basis is [R, F]
        ba = tl.load(basis_ptr + rows + (f0 + dim_a)[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        bb = tl.load(basis_ptr + rows + (f0 + dim_b)[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        acc_a = tl.dot(coef, ba, acc_a, input_precision=PRECISION)
        acc_b = tl.dot(coef, bb, acc_b, input_precision=PRECISION)
        if REST_P > 0:
            bc = tl.load(basis_ptr + rows + (f0 + dim_c)[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
            acc_c = tl.dot(coef, bc, acc_c, input_precision=PRECISION)
    xa = acc_a + tl.load(mean_ptr + f0 + dim_a, mask=d_ok, other=0.0)[None, :]
    xb = acc_b + tl.load(mean_ptr + f0 + dim_b, mask=d_ok, other=0.0)[None, :]
    if ROTATE:
        cs_off = layer * rope_stride + t[:, None] * HALF + tl.arange(0, HALF_P)[None, :]
        cs_mask = t_ok[:, None] & d_ok[None, :]
        cos = tl.load(cos_ptr + cs_off, mask=cs_mask, other=0.0)
        sin = tl.load(sin_ptr + cs_off, mask=cs_mask, other=0.0)
        ya = xa * cos - xb * sin
        yb = xb * cos + xa * sin
    else:
        ya = xa
        yb = xb
    base = tl.load(layer_ptrs + layer).to(tl.pointer_type(DTYPE))
    rows_out = tl.load(slots_ptr + t, mask=t_ok, other=0).to(tl.int64) * row_stride
    head = base + rows_out[:, None] + h * D
    m = t_ok[:, None] & d_ok[None, :]
    tl.store(head + dim_a[None, :], ya.to(DTYPE), mask=m)
    tl.store(head + dim_b[None, :], yb.to(DTYPE), mask=m)
    if REST_P > 0:
        xc = acc_c + tl.load(mean_ptr + f0 + dim_c, mask=c_ok, other=0.0)[None, :]
        tl.store(head + dim_c[None, :], xc.to(DTYPE), mask=t_ok[:, None] & c_ok[None, :])


def decode_meta(pool: PoolGeometry, rope: RopeGeometry, tile: Tiles, precision: str) -> dict[str, Any]:
    """Meta-parameters and options :func:`decode_into` launches ``_decode_kernel`` with (also the AOT list's)."""
    meta = {**geometry_constexprs(pool, rope), "BLOCK_T": tile.block_t, "BLOCK_R": tile.block_r}
    meta["PRECISION"] = check_precision(precision)
    meta["enable_fp_fusion"] = False  # lo + code * step rounds as torch does (no FMA contraction)
    meta["num_warps"] = DECODE_NUM_WARPS
    return meta


def decode_into(
    payload: torch.Tensor,
    plan: StreamPlan,
    fp8_scale: torch.Tensor,
    dec_basis: torch.Tensor,
    mean: torch.Tensor,
    rope: RopeTables | None,
    table: LayerTable,
    slots: torch.Tensor,
    precision: str = "ieee",
) -> None:
    """Decode one stream's payload into the pool rows at ``slots``.

    Args:
        payload: ``[plan.nbytes(T)]`` uint8, this stream's bytes.
        plan, fp8_scale: the stream's plan and ``[R]`` fp32 fp8 scales.
        dec_basis: ``[R, F]`` fp32 contiguous decoding basis (per-feature scale folded in).
        mean: ``[F]`` fp32.
        rope: the keys' RoPE tables at the tokens' positions (re-applied); ``None`` for values.
        table: the destination per-layer buffers ``L x [N, H, D]``; written in their dtype.
        slots: ``[T]`` destination rows.
        precision: ``tl.dot`` input precision, one of :data:`~.common.DOT_PRECISIONS`.
    """
    device = launch_device(_decode_kernel, table.device)
    slots = table.check_slots(slots)
    num_t, feat = slots.numel(), table.num_features
    check_tensor(payload, (("nbytes", plan.nbytes(num_t)),), torch.uint8, device, f"payload for T={num_t}")
    check_tensor(dec_basis, (("R", plan.rank), ("F", feat)), torch.float32, device, "dec_basis", contiguous=True)
    check_tensor(mean, (("F", feat),), torch.float32, device, "mean")
    check_tensor(fp8_scale, (("R", plan.rank),), torch.float32, device, "fp8_scale")
    check_tensor(plan.comp_group, (("R", plan.rank),), torch.int32, device, "plan tables")
    payload = payload.contiguous()
    ra = rope_args(rope, table, num_t, placeholder=mean)
    precision = check_precision(precision)
    if num_t == 0:
        return
    tile = tiles(DECODE_TILES, _decode_kernel)
    grid = (triton.cdiv(num_t, tile.block_t), table.num_layers * table.num_heads)
    _decode_kernel[grid](
        payload, plan.comp_group, plan.group_start, plan.group_bits, plan.group_kind,
        plan.group_offsets(num_t), fp8_scale,
        dec_basis, mean, ra.cos, ra.sin, table.ptrs, slots,
        num_t, plan.rank,
        table.row_stride, ra.stride,
        **decode_meta(table, ra, tile, precision),
    )  # fmt: skip


def decode_into_ref(
    payload: torch.Tensor,
    plan: StreamPlan,
    fp8_scale: torch.Tensor,
    dec_basis: torch.Tensor,
    mean: torch.Tensor,
    rope: RopeTables | None,
    buffers: list[torch.Tensor],
    slots: torch.Tensor,
) -> None:
    """Plain-torch :func:`decode_into`: dequantize ``[T, R]``, ``@ dec_basis + mean``, re-apply RoPE, scatter."""
    num_t = slots.numel()
    num_l, (heads, head_dim) = len(buffers), buffers[0].shape[1:]
    coeffs = dequant_ref(payload, plan, fp8_scale, num_t)  # [T, R]
    x = (coeffs @ dec_basis + mean).reshape(num_t, num_l, heads, head_dim).permute(1, 0, 2, 3)  # [L, T, H, D]
    if rope is not None:
        x = rotate_ref(x, rope, 1.0)
    for layer, buf in enumerate(buffers):
        buf.index_copy_(0, slots.to(buf.device), x[layer].to(buf.dtype))
