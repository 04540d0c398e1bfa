"""Fused encode, part 2: quantize coefficients per token per group and bit-pack them into the payload.

One launch per group kind (int2/int4/int8/fp8), one program per (group, block of tokens). Integer
groups: pass 1 finds each token's min/max over the group's components (any group size, in column
chunks), writes fp16 ``min`` and ``step``; pass 2 writes the codes, ``8 / b`` tokens per byte. Each
component's row of codes starts on a byte and token blocks are multiples of 8, so programs write
disjoint bytes. The bytes equal :func:`kvtc_sglang.codec.quant.encode_coefficients` for the same
coefficients (``torch.equal``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec.quant import encode_coefficients
from .common import check_device, fp32_to_e4m3_bits, is_interpreted, round_half_even
from .plan import StreamPlan


@triton.jit
def _store_fp16_bytes(ptr, x, mask):
    """Store fp16 ``x`` as two little-endian bytes at ``ptr`` (payload offsets need not be even)."""
    bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    tl.store(ptr, (bits & 0xFF).to(tl.uint8), mask=mask)
    tl.store(ptr + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def _quant_pack_kernel(
    coeffs_ptr, out_ptr, fp8_scale_ptr,
    group_ids, group_start, group_size, group_off,
    num_tokens, rank,
    BITS: tl.constexpr, IS_FP8: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    gid = tl.load(group_ids + tl.program_id(0))
    start = tl.load(group_start + gid)
    size = tl.load(group_size + gid)
    off = tl.load(group_off + gid)  # int64 byte offset of the group in the payload
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    t_ok = t < num_tokens
    col = tl.arange(0, BLOCK_C)  # [BC]
    if IS_FP8:  # bytes [s, T]: component-major, one byte per code
        for c0 in range(0, size, BLOCK_C):
            c = c0 + col
            m = (c < size)[:, None] & t_ok[None, :]  # [BC, BT]
            x = tl.load(coeffs_ptr + t[None, :].to(tl.int64) * rank + (start + c)[:, None], mask=m, other=0.0)
            scale = tl.load(fp8_scale_ptr + start + c, mask=c < size, other=1.0)
            y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -448.0), 448.0)
            code = fp32_to_e4m3_bits(y)
            tl.store(out_ptr + off + c[:, None].to(tl.int64) * num_tokens + t[None, :], code.to(tl.uint8), mask=m)
    else:
        LEVELS: tl.constexpr = (1 << BITS) - 1
        PER: tl.constexpr = 8 // BITS
        lo = tl.full((BLOCK_T,), float("inf"), tl.float32)
        hi = tl.full((BLOCK_T,), float("-inf"), tl.float32)
        for c0 in range(0, size, BLOCK_C):  # pass 1: per-token min/max over the group
            c = c0 + col
            m = (c < size)[:, None] & t_ok[None, :]
            x = tl.load(coeffs_ptr + t[None, :].to(tl.int64) * rank + (start + c)[:, None], mask=m, other=0.0)
            lo = tl.minimum(lo, tl.min(tl.where(m, x, float("inf")), axis=0))
            hi = tl.maximum(hi, tl.max(tl.where(m, x, float("-inf")), axis=0))
        lo16 = tl.minimum(tl.maximum(lo, -65504.0), 65504.0).to(tl.float16)
        lof = lo16.to(tl.float32)
        step16 = tl.minimum(tl.maximum(tl.math.div_rn(hi - lof, LEVELS * 1.0), 0.0), 65504.0).to(tl.float16)
        stepf = step16.to(tl.float32)
        _store_fp16_bytes(out_ptr + off + 2 * t, lo16, t_ok)
        _store_fp16_bytes(out_ptr + off + 2 * num_tokens + 2 * t, step16, t_ok)
        safe = tl.where(stepf > 0, stepf, 1.0)
        row_bytes = (num_tokens * BITS + 7) // 8
        codes_off = off + 4 * num_tokens
        byte_idx = tl.program_id(1) * (BLOCK_T // PER) + tl.arange(0, BLOCK_T // PER)  # [BT / PER]
        shifts = (tl.arange(0, PER) * BITS)[None, None, :]
        for c0 in range(0, size, BLOCK_C):  # pass 2: codes, packed
            c = c0 + col
            m = (c < size)[:, None] & t_ok[None, :]
            x = tl.load(coeffs_ptr + t[None, :].to(tl.int64) * rank + (start + c)[:, None], mask=m, other=0.0)
            v = tl.math.div_rn(x - lof[None, :], safe[None, :])
            q = round_half_even(tl.minimum(tl.maximum(v, -1.0), LEVELS + 1.0))
            q = tl.minimum(tl.maximum(q, 0.0), LEVELS * 1.0)
            q = tl.where(m & (stepf[None, :] > 0), q, 0.0).to(tl.int32)  # [BC, BT]; padding codes are 0
            packed = tl.sum(tl.reshape(q, (BLOCK_C, BLOCK_T // PER, PER)) << shifts, axis=2)  # [BC, BT / PER]
            dst = out_ptr + codes_off + c[:, None].to(tl.int64) * row_bytes + byte_idx[None, :]
            tl.store(dst, packed.to(tl.uint8), mask=(c < size)[:, None] & (byte_idx < row_bytes)[None, :])


def quant_pack(
    coeffs: torch.Tensor, plan: StreamPlan, fp8_scale: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize and pack one stream's coefficients.

    Args:
        coeffs: ``[T, R]`` fp32, ``R = plan.rank``.
        plan: the stream's :class:`StreamPlan`.
        fp8_scale: ``[R]`` fp32 per-component scale of fp8 groups.
        out: optional caller-owned ``[plan.nbytes(T)]`` uint8 buffer (for example a slice of the payload).

    Returns:
        ``[plan.nbytes(T)]`` uint8, the same bytes as ``encode_coefficients``.
    """
    if coeffs.dim() != 2 or coeffs.shape[1] != plan.rank or coeffs.dtype != torch.float32:
        raise ValueError(f"coeffs must be [T, R={plan.rank}] float32, got {list(coeffs.shape)} {coeffs.dtype}")
    if not coeffs.is_contiguous():
        raise ValueError("coeffs must be contiguous")
    if fp8_scale.shape != (plan.rank,) or fp8_scale.dtype != torch.float32:
        raise ValueError(f"fp8_scale must be [R={plan.rank}] float32, got {list(fp8_scale.shape)} {fp8_scale.dtype}")
    num_t = coeffs.shape[0]
    nbytes = plan.nbytes(num_t)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=coeffs.device)
    if out.shape != (nbytes,) or out.dtype != torch.uint8 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous [{nbytes}] uint8, got {list(out.shape)} {out.dtype}")
    check_device(_quant_pack_kernel, coeffs, fp8_scale, out, plan.group_start)
    if num_t == 0:
        return out
    block_t = 256 if is_interpreted(_quant_pack_kernel) else 64
    offsets = plan.group_offsets(num_t)
    for cls in plan.classes:
        block_c = min(256, max(16, triton.next_power_of_2(cls.max_size)))
        grid = (cls.group_ids.numel(), triton.cdiv(num_t, block_t))
        _quant_pack_kernel[grid](
            coeffs, out, fp8_scale,
            cls.group_ids, plan.group_start, plan.group_size, offsets,
            num_t, plan.rank,
            BITS=cls.bits, IS_FP8=cls.kind == "fp8", BLOCK_T=block_t, BLOCK_C=block_c,
        )  # fmt: skip
    return out


quant_pack_ref = encode_coefficients  # (coeffs [T, R], allocation, fp8_scale [R]) -> payload bytes
