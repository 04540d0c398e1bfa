"""Fused encode, part 2: quantize coefficients per token per group and bit-pack them into the payload.

One launch per group kind (int2/int4/int8/fp8), one program per (group, block of tokens). Integer
groups: pass 1 finds each token's min/max over the group's components (any group size, in column
chunks), writes fp16 ``min`` and ``step``; pass 2 writes the codes, ``8 / b`` tokens per byte. Each
component's row of codes starts on a byte and token blocks are multiples of 8, so programs write
disjoint bytes. The bytes equal :func:`quant_pack_ref` (and the codec's torch quantizer) for the same
coefficients (``torch.equal``).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ..payload_format import FP8_MAX, FP16_MAX, GroupKind, row_nbytes
from .common import (
    FP8_MAX_C,
    FP16_MAX_C,
    Tiles,
    check_tensor,
    fp32_to_e4m3_bits,
    launch_device,
    round_half_even,
    tiles,
)
from .plan import StreamPlan

# block_t: tokens per program (a multiple of 8: whole bytes of every code width); block_r: the largest
# column block (the block follows the class's largest group, 16 up to this; bigger groups loop over
# blocks, which gives the same bytes). On CUDA, 32: 64-256 spilled up to 2.7 KB per thread (int8 at 64 on
# sm_100 already 88 bytes), 32 spills nothing on sm_90 and sm_100 (benchmarks/aot_compile.py).
QUANT_PACK_TILES = {"cuda": Tiles(block_t=64, block_r=32), "interpreter": Tiles(block_t=256, block_r=256)}


@triton.jit
def _store_fp16_bytes(ptr, x, mask):
    """Store fp16 ``x`` ``[BT]`` as two little-endian bytes each at ``ptr [BT]`` (offsets need not be even)."""
    bits = x.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    tl.store(ptr, (bits & 0xFF).to(tl.uint8), mask=mask)
    tl.store(ptr + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def _quant_pack_kernel(
    # pointers
    coeffs_ptr, out_ptr, fp8_scale_ptr, group_ids, group_start, group_size, group_off,
    # sizes
    num_tokens, rank,
    # meta-parameters
    BITS: tl.constexpr, IS_FP8: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):  # fmt: skip
    """Quantize and pack tokens ``[pid1 * BLOCK_T, +BLOCK_T)`` of group ``group_ids[pid0]``.

    coeffs ``[T, R]`` fp32 (row stride ``rank``); out ``[nbytes(T)]`` uint8 payload; fp8_scale ``[R]`` fp32;
    group_ids ``[G_c]`` int32 (this launch's groups); group_start, group_size ``[G]`` int32; group_off
    ``[G + 1]`` int64 byte offsets. Grid ``(G_c, cdiv(T, BLOCK_T))``.
    """
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
            y = tl.minimum(tl.maximum(tl.math.div_rn(x, scale[:, None]), -FP8_MAX_C), FP8_MAX_C)
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
        lo16 = tl.minimum(tl.maximum(lo, -FP16_MAX_C), FP16_MAX_C).to(tl.float16)
        lof = lo16.to(tl.float32)
        step16 = tl.minimum(tl.maximum(tl.math.div_rn(hi - lof, LEVELS * 1.0), 0.0), FP16_MAX_C).to(tl.float16)
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


def quant_pack_meta(kind: GroupKind, max_size: int, tile: Tiles) -> dict[str, Any]:
    """Meta-parameters :func:`quant_pack` launches ``_quant_pack_kernel`` with for a class of ``kind`` groups
    of at most ``max_size`` components (also the AOT compile list's): the column block follows the size."""
    block_c = min(tile.block_r, max(16, triton.next_power_of_2(max_size)))
    return {"BITS": kind.bits, "IS_FP8": kind is GroupKind.FP8, "BLOCK_T": tile.block_t, "BLOCK_C": block_c}


def quant_pack(
    coeffs: torch.Tensor, plan: StreamPlan, fp8_scale: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize and pack one stream's coefficients.

    Args:
        coeffs: ``[T, R]`` fp32, contiguous, ``R = plan.rank``.
        plan: the stream's :class:`StreamPlan`.
        fp8_scale: ``[R]`` fp32 per-component scale of fp8 groups.
        out: optional caller-owned ``[plan.nbytes(T)]`` uint8 buffer (for example a slice of the payload).

    Returns:
        ``[plan.nbytes(T)]`` uint8, the same bytes as :func:`quant_pack_ref`.
    """
    device = launch_device(_quant_pack_kernel, coeffs.device)
    check_tensor(coeffs, (("T", None), ("R", plan.rank)), torch.float32, device, "coeffs", contiguous=True)
    check_tensor(fp8_scale, (("R", plan.rank),), torch.float32, device, "fp8_scale")
    check_tensor(plan.group_start, (("G", None),), torch.int32, device, "plan tables")
    num_t = coeffs.shape[0]
    nbytes = plan.nbytes(num_t)
    if out is None:
        out = torch.empty(nbytes, dtype=torch.uint8, device=device)
    check_tensor(out, (("nbytes", nbytes),), torch.uint8, device, "out", contiguous=True)
    if num_t == 0:
        return out
    tile = tiles(QUANT_PACK_TILES, _quant_pack_kernel)
    offsets = plan.group_offsets(num_t)
    for cls in plan.classes:
        grid = (cls.group_ids.numel(), triton.cdiv(num_t, tile.block_t))
        _quant_pack_kernel[grid](
            coeffs, out, fp8_scale, cls.group_ids, plan.group_start, plan.group_size, offsets,
            num_t, plan.rank,
            **quant_pack_meta(cls.kind, cls.max_size, tile),
        )  # fmt: skip
    return out


def quant_pack_ref(coeffs: torch.Tensor, plan: StreamPlan, fp8_scale: torch.Tensor) -> torch.Tensor:
    """Plain-torch :func:`quant_pack`: ``coeffs [T, R]`` fp32 -> ``[plan.nbytes(T)]`` uint8."""
    num_t = coeffs.shape[0]
    parts = []
    for start, size, kind in plan.spans:
        seg = coeffs[:, start : start + size].to(torch.float32)  # [T, s]
        if kind is GroupKind.FP8:
            y = (seg / fp8_scale[start : start + size][None, :]).clamp(-FP8_MAX, FP8_MAX)
            parts.append(y.to(torch.float8_e4m3fn).view(torch.uint8).t().reshape(-1))  # [s * T] component-major
            continue
        levels = (1 << kind.bits) - 1
        lo = seg.amin(dim=1).clamp(-FP16_MAX, FP16_MAX).to(torch.float16)  # [T]
        step = ((seg.amax(dim=1) - lo.float()) / levels).clamp(0.0, FP16_MAX).to(torch.float16)  # [T]
        stepf = step.float()
        q = torch.round((seg - lo.float()[:, None]) / torch.where(stepf > 0, stepf, 1.0)[:, None]).clamp(0, levels)
        q = torch.where(stepf[:, None] > 0, q, 0.0).to(torch.int32).t()  # [s, T]
        per = 8 // kind.bits
        q = torch.nn.functional.pad(q, (0, (-num_t) % per)).reshape(size, -1, per)  # [s, T' / per, per]
        shifts = torch.arange(per, device=q.device, dtype=torch.int32) * kind.bits
        packed = (q << shifts).sum(dim=2).to(torch.uint8).reshape(-1)  # [s * row_nbytes(T, b)]
        parts += [lo.view(torch.uint8), step.view(torch.uint8), packed]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8, device=coeffs.device)


def dequant_ref(payload: torch.Tensor, plan: StreamPlan, fp8_scale: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Plain-torch inverse of :func:`quant_pack_ref`: ``[plan.nbytes(T)]`` uint8 -> ``[T, R]`` fp32 (drops 0)."""
    out = torch.zeros(num_tokens, plan.rank, dtype=torch.float32, device=payload.device)
    off = 0
    for start, size, kind in plan.spans:
        if kind is GroupKind.FP8:
            codes = payload[off : off + size * num_tokens].reshape(size, num_tokens).t().contiguous()  # [T, s]
            out[:, start : start + size] = codes.view(torch.float8_e4m3fn).float() * fp8_scale[start : start + size]
            off += size * num_tokens
            continue
        lo = payload[off : off + 2 * num_tokens].clone().view(torch.float16).float()  # [T]
        step = payload[off + 2 * num_tokens : off + 4 * num_tokens].clone().view(torch.float16).float()
        off += 4 * num_tokens
        per, nbytes = 8 // kind.bits, row_nbytes(num_tokens, kind.bits)
        shifts = torch.arange(per, device=payload.device, dtype=torch.int32) * kind.bits
        rows = payload[off : off + size * nbytes].to(torch.int32).reshape(size, nbytes)  # [s, row bytes]
        codes = ((rows[:, :, None] >> shifts) & ((1 << kind.bits) - 1)).reshape(size, -1)[:, :num_tokens]  # [s, T]
        off += size * nbytes
        out[:, start : start + size] = lo[:, None] + codes.t().float() * step[:, None]
    return out
