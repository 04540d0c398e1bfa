"""Per-token per-group quantization of PCA coefficients and bit-packing into a byte payload.

Pure torch, device-agnostic (CPU or CUDA); the Triton kernels must produce the same bytes. The
payload layout (and its sizes) is :mod:`kvtc_sglang.payload_format`'s: each component's row of codes is
zero-padded to a whole byte, so a block of 8 tokens of one component is whole bytes and GPU programs
write disjoint bytes.
"""

from __future__ import annotations

import torch

from ..payload_format import FP8_MAX, FP16_MAX, GroupKind, row_nbytes
from ..payload_format import group_nbytes as _group_nbytes
from .allocation import Allocation, Group


def group_nbytes(group: Group, num_tokens: int) -> int:
    """Bytes one coded group takes in the payload for ``num_tokens`` tokens."""
    return _group_nbytes(group.size, group.kind, num_tokens)


def payload_nbytes(alloc: Allocation, num_tokens: int) -> int:
    """Exact payload size in bytes of one stream coded with ``alloc``."""
    return sum(group_nbytes(g, num_tokens) for g in alloc.coded_groups())


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[s, T]`` uint8 (each < 2**bits) row by row into ``[s * row_nbytes(T, bits)]`` uint8."""
    per = 8 // bits
    s, n = codes.shape
    c = torch.nn.functional.pad(codes.to(torch.int32), (0, (-n) % per))  # [s, T'] with per | T'
    c = c.reshape(s, -1, per)  # [s, T' / per, per]
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=2).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, rows: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[rows * row_nbytes(n, bits)]`` uint8 -> codes ``[rows, n]`` uint8."""
    per = 8 // bits
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).reshape(rows, -1)[:, :, None] >> shifts) & ((1 << bits) - 1)  # [s, nbytes, per]
    return c.reshape(rows, -1)[:, :n].to(torch.uint8)


def quantize_int(seg: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantization per row.

    Args:
        seg: ``[T, s]`` float32 coefficients.
        bits: 2, 4 or 8.

    Returns:
        ``(codes [T, s] uint8, min [T] fp16, step [T] fp16)``; the codes are computed against the
        fp16-rounded ``min`` and ``step`` so that decoding reproduces exactly what was measured.
    """
    levels = (1 << bits) - 1
    lo = seg.amin(dim=1).clamp(-FP16_MAX, FP16_MAX).to(torch.float16)  # [T]
    hi = seg.amax(dim=1)
    step = ((hi - lo.float()) / levels).clamp(0.0, FP16_MAX).to(torch.float16)  # [T]
    stepf = step.float()
    safe = torch.where(stepf > 0, stepf, torch.ones_like(stepf))
    q = torch.round((seg - lo.float()[:, None]) / safe[:, None]).clamp_(0, levels)
    q = torch.where(stepf[:, None] > 0, q, torch.zeros_like(q))
    return q.to(torch.uint8), lo, step


def dequantize_int(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``codes [T, s]`` uint8, ``lo``/``step`` ``[T]`` fp16 -> ``[T, s]`` float32."""
    return lo.float()[:, None] + codes.float() * step.float()[:, None]


def quantize_fp8(seg: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``seg [T, s]`` float32 / ``scale [s]`` -> float8 e4m3 bit patterns ``[T, s]`` uint8 (saturating)."""
    x = (seg / scale[None, :]).clamp(-FP8_MAX, FP8_MAX)
    return x.to(torch.float8_e4m3fn).view(torch.uint8)


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float8 e4m3 bit patterns ``[T, s]`` uint8 -> ``[T, s]`` float32 times ``scale [s]``."""
    return codes.view(torch.float8_e4m3fn).float() * scale[None, :]


def encode_coefficients(coeffs: torch.Tensor, alloc: Allocation, fp8_scale: torch.Tensor) -> torch.Tensor:
    """Quantize and pack ``coeffs [T, R]`` float32 (``R >= alloc.rank``) into a uint8 payload.

    ``fp8_scale [R]`` float32 holds the per-component scale of fp8 groups. The result has exactly
    :func:`payload_nbytes` bytes and lives on ``coeffs.device``.
    """
    num_tokens = coeffs.shape[0]
    parts: list[torch.Tensor] = []
    for g in alloc.coded_groups():
        seg = coeffs[:, g.start : g.start + g.size]  # [T, s]
        if g.kind is GroupKind.FP8:
            codes = quantize_fp8(seg, fp8_scale[g.start : g.start + g.size])
            parts.append(codes.t().reshape(-1))  # component-major [s * T]
            continue
        bits = g.kind.bits
        codes, lo, step = quantize_int(seg, bits)
        parts.append(lo.view(torch.uint8).reshape(-1))  # [2T]
        parts.append(step.view(torch.uint8).reshape(-1))  # [2T]
        parts.append(pack_codes(codes.t(), bits))  # component-major rows [s, T] of codes
    if not parts:
        return torch.empty(0, dtype=torch.uint8, device=coeffs.device)
    out = torch.cat(parts)
    expected = payload_nbytes(alloc, num_tokens)
    if out.numel() != expected:
        raise RuntimeError(f"payload size mismatch: expected {expected} bytes, built {out.numel()}")
    return out


def decode_coefficients(
    payload: torch.Tensor, alloc: Allocation, fp8_scale: torch.Tensor, num_tokens: int, rank: int
) -> torch.Tensor:
    """Inverse of :func:`encode_coefficients`: uint8 payload -> ``[T, rank]`` float32 (drops are 0)."""
    expected = payload_nbytes(alloc, num_tokens)
    if payload.numel() != expected:
        raise ValueError(f"payload must hold {expected} bytes for {num_tokens} tokens, got {payload.numel()}")
    out = torch.zeros(num_tokens, rank, dtype=torch.float32, device=payload.device)
    off = 0
    for g in alloc.coded_groups():
        n = g.size * num_tokens
        if g.kind is GroupKind.FP8:
            codes = payload[off : off + n].reshape(g.size, num_tokens).t()  # [T, s]
            scale = fp8_scale[g.start : g.start + g.size]
            out[:, g.start : g.start + g.size] = dequantize_fp8(codes.contiguous(), scale)
            off += n
            continue
        bits = g.kind.bits
        lo = payload[off : off + 2 * num_tokens].clone().view(torch.float16)  # clone: offset may be odd
        step = payload[off + 2 * num_tokens : off + 4 * num_tokens].clone().view(torch.float16)
        off += 4 * num_tokens
        nbytes = g.size * row_nbytes(num_tokens, bits)
        codes = unpack_codes(payload[off : off + nbytes], bits, g.size, num_tokens).t()  # [T, s]
        off += nbytes
        out[:, g.start : g.start + g.size] = dequantize_int(codes, lo, step)
    return out
