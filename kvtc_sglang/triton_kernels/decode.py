"""Fused decode: unpack, dequantize, project back, add the mean, re-apply RoPE, scatter into the pool.

One program per (block of tokens, layer x head): it dequantizes the block's coefficients straight from
the payload bytes (``[BLOCK_T, BLOCK_R]`` at a time), multiplies them with the decoding basis columns of
its head (``tl.dot``, fp32 accumulate) and writes the head's ``[BLOCK_T, D]`` rows into the layer's
buffer at the destination slots, in the buffer's dtype. The ``[T, F]`` K/V never exists in memory: a
restored node lands directly in the pages FlashInfer reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ..codec.quant import decode_coefficients
from ..codec.rope import RopeConfig, apply_rope
from .common import LayerTable, check_device, check_precision, e4m3_bits_to_fp32, is_interpreted, tl_dtype
from .plan import KIND_FP8, KIND_INT, StreamPlan
from .project import _head_dims, rope_args

_INT: tl.constexpr = tl.constexpr(KIND_INT)
_FP8: tl.constexpr = tl.constexpr(KIND_FP8)


@triton.jit
def _load_fp16_bytes(ptr, mask):
    b0 = tl.load(ptr, mask=mask, other=0).to(tl.int32)
    b1 = tl.load(ptr + 1, mask=mask, other=0).to(tl.int32)
    return (b0 | (b1 << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequant_tile(payload_ptr, comp_group, group_start, group_bits, group_kind, group_off, fp8_scale_ptr,
                  t, t_ok, r, r_ok, num_tokens):  # fmt: skip
    """Coefficients ``[BT, BR]`` fp32 of tokens ``t`` and components ``r`` (dropped components are 0)."""
    g = tl.load(comp_group + r, mask=r_ok, other=-1)  # [BR]
    coded = g >= 0
    gs = tl.where(coded, g, 0)
    start = tl.load(group_start + gs, mask=coded, other=0)
    bits = tl.load(group_bits + gs, mask=coded, other=8)
    kind = tl.load(group_kind + gs, mask=coded, other=0)
    off = tl.load(group_off + gs, mask=coded, other=0)  # int64
    local = (r - start).to(tl.int64)  # component index inside its group
    m = t_ok[:, None] & coded[None, :]
    is_int = (kind == _INT)[None, :] & m
    is_fp8 = (kind == _FP8)[None, :] & m
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
    payload_ptr, comp_group, group_start, group_bits, group_kind, group_off, fp8_scale_ptr,
    basis_ptr, mean_ptr, cos_ptr, sin_ptr, layer_ptrs, slots_ptr,
    num_tokens, rank, row_stride, rope_stride,
    L: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, REST_P: tl.constexpr,
    ROTATE: tl.constexpr, GPTJ: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < num_tokens
    layer = tl.program_id(1) // H
    h = tl.program_id(1) % H
    f0 = (layer * H + h) * D
    dim_a, dim_b, dim_c, d_ok = _head_dims(HALF, HALF_P, REST_P, GPTJ)
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


def decode_into(
    payload: torch.Tensor,
    plan: StreamPlan,
    fp8_scale: torch.Tensor,
    dec_basis: torch.Tensor,
    mean: torch.Tensor,
    rope: RopeConfig | Sequence[RopeConfig] | None,
    positions: torch.Tensor | None,
    table: LayerTable,
    slots: torch.Tensor,
    precision: str = "ieee",
) -> None:
    """Decode one stream's payload into the pool rows at ``slots``.

    Args:
        payload: ``[plan.nbytes(T)]`` uint8, this stream's bytes.
        plan, fp8_scale: the stream's plan and ``[R]`` fp32 fp8 scales.
        dec_basis: ``[R, F]`` fp32 decoding basis (per-feature scale folded in).
        mean: ``[F]`` fp32.
        rope, positions: the model's RoPE (one config or one per layer) and ``[T]`` absolute positions
            for keys; ``None`` for values.
        table: the destination per-layer buffers ``L x [N, H, D]``; written in their dtype.
        slots: ``[T]`` destination rows.
        precision: ``tl.dot`` input precision, one of :data:`~.common.DOT_PRECISIONS`.
    """
    slots = table.check_slots(slots)
    num_t = slots.numel()
    heads, head_dim = table.buffers[0].shape[1:]
    feat = table.num_layers * heads * head_dim
    if payload.shape != (plan.nbytes(num_t),) or payload.dtype != torch.uint8:
        raise ValueError(f"payload must be [{plan.nbytes(num_t)}] uint8 for T={num_t}, got {list(payload.shape)}")
    if dec_basis.shape != (plan.rank, feat) or dec_basis.dtype != torch.float32 or not dec_basis.is_contiguous():
        raise ValueError(f"dec_basis must be contiguous [R={plan.rank}, F={feat}] float32, got {list(dec_basis.shape)}")
    if mean.shape != (feat,) or fp8_scale.shape != (plan.rank,):
        raise ValueError(f"mean must be [F={feat}] and fp8_scale [R={plan.rank}], got {list(mean.shape)}")
    payload = payload.contiguous()
    check_device(_decode_kernel, payload, dec_basis, mean, fp8_scale, slots, plan.comp_group)
    ra = rope_args(rope, positions, num_t, table.num_layers, head_dim, placeholder=mean)
    if num_t == 0:
        return
    big = is_interpreted(_decode_kernel)
    block_t = 128 if big else 64
    block_r = 512 if big else 64
    grid = (triton.cdiv(num_t, block_t), table.num_layers * heads)
    _decode_kernel[grid](
        payload, plan.comp_group, plan.group_start, plan.group_bits, plan.group_kind,
        plan.group_offsets(num_t), fp8_scale,
        dec_basis, mean, ra.cos, ra.sin, table.ptrs, slots,
        num_t, plan.rank, table.row_stride, ra.stride,
        L=table.num_layers, H=heads, D=head_dim, DTYPE=tl_dtype(table.dtype),
        HALF=ra.half, HALF_P=ra.half_p, REST_P=ra.rest_p, ROTATE=ra.rotate, GPTJ=ra.gptj,
        BLOCK_T=block_t, BLOCK_R=block_r, PRECISION=check_precision(precision),
        enable_fp_fusion=False,  # lo + code * step rounds as torch does (no FMA contraction)
    )  # fmt: skip


def decode_into_ref(
    payload: torch.Tensor,
    alloc: object,
    fp8_scale: torch.Tensor,
    dec_basis: torch.Tensor,
    mean: torch.Tensor,
    rope: RopeConfig | Sequence[RopeConfig] | None,
    positions: torch.Tensor | None,
    buffers: list[torch.Tensor],
    slots: torch.Tensor,
) -> None:
    """Plain-torch :func:`decode_into` (``alloc`` is the stream's :class:`Allocation`)."""
    num_t = slots.numel()
    num_l, (heads, head_dim) = len(buffers), buffers[0].shape[1:]
    coeffs = decode_coefficients(payload, alloc, fp8_scale, num_t, dec_basis.shape[0])  # [T, R]
    x = (coeffs @ dec_basis + mean).reshape(num_t, num_l, heads, head_dim).permute(1, 0, 2, 3)  # [L, T, H, D]
    if rope is not None:
        x = apply_rope(x, positions, rope)
    for layer, buf in enumerate(buffers):
        buf.index_copy_(0, slots.to(buf.device), x[layer].to(buf.dtype))
