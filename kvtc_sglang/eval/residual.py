"""Joint encoding probe, coding side: a span coded as a reference plus a quantized residual in KVTC's coefficient
domain, with the residual's own DP bit allocation, against KVTC coding the span alone.

The reader's features ``x`` (keys with RoPE removed, values; ``[T, F]``) are coded against a reference ``x_ref``
of the same text read in another context (exact, or as its own KVTC blob decodes): ``d = (x - x_ref) @ E``
(``E [F, R]``: the artifact's encode basis, per-feature scale included, so ``d`` is in the calibration's KL
units), quantized with an allocation the DP fits on residuals; ``x' = x_ref + d' @ D``. Components past the
artifact's rank are not coded: there ``x'`` keeps the reference's. Pure torch; no model, no SGLang.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..calibration.bitalloc import allocate_bits_joint, measure_group_errors
from ..calibration.fit import KINDS, fp8_scales
from ..codec import KVTCCodec, ZlibDeflate
from ..codec.allocation import Allocation
from ..codec.backend import DeviceStreams
from ..codec.quant import decode_coefficients, encode_coefficients
from ..codec.rope import apply_rope, remove_rope


def features(codec: KVTCCodec, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``[L, T, H, D]`` K (RoPE at ``positions [T]``) and V -> ``([T, F], [T, F])`` float32: RoPE-free keys, values."""
    num_t = k.shape[1]
    xk = remove_rope(k, positions, codec.spec.ropes, tokens_first=True).reshape(num_t, -1)  # [T, L, H, D] -> [T, F]
    xv = v.float().permute(1, 0, 2, 3).reshape(num_t, -1)  # [T, F]
    return xk, xv


def unfeatures(
    codec: KVTCCodec, xk: torch.Tensor, xv: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`features`: keys rotated at ``positions``; ``[L, T, H, D]`` ``dtype`` each."""
    s = codec.spec
    shape = (xk.shape[0], s.num_layers, s.num_kv_heads, s.head_dim)
    k = apply_rope(xk.reshape(shape).permute(1, 0, 2, 3), positions, s.ropes)  # [T, F] -> [L, T, H, D]
    v = xv.reshape(shape).permute(1, 0, 2, 3)  # [T, F] -> [L, T, H, D]
    return k.to(dtype).contiguous(), v.to(dtype).contiguous()


def _bases(codec: KVTCCodec) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``(enc [F, R], dec [R, F])`` for K, then V: the codec's own projections (per-feature scale included)."""
    s = DeviceStreams.build(codec.artifact, torch.device("cpu"))
    return (s.keys.enc_basis, s.keys.dec_basis), (s.values.enc_basis, s.values.dec_basis)


def residual_coefficients(codec: KVTCCodec, x: tuple, x_ref: tuple) -> torch.Tensor:
    """``d = (x - x_ref) @ E`` for K and V, padded with zero columns to one rank: ``[T, 2, R]`` float32
    (``R = max(R_k, R_v)``; a zero column costs nothing in the DP)."""
    (ek, _), (ev, _) = _bases(codec)
    r = max(ek.shape[1], ev.shape[1])
    dk = torch.nn.functional.pad((x[0] - x_ref[0]) @ ek, (0, r - ek.shape[1]))  # [T, R]
    dv = torch.nn.functional.pad((x[1] - x_ref[1]) @ ev, (0, r - ev.shape[1]))
    return torch.stack([dk, dv], dim=1)  # [T, 2, R]


@dataclass(frozen=True)
class ResidualCode:
    """A residual allocation for K and V and their fp8 scales ``[R]`` (fitted on calibration residuals)."""

    keys: Allocation
    values: Allocation
    fp8_scale: torch.Tensor  # [2, R]: K then V


@dataclass(frozen=True)
class ResidualFit:
    """The DP's group errors of calibration residuals ``[N, 2, R]``: allocations at any budget, made once."""

    errors: tuple[dict, dict]
    fp8_scale: torch.Tensor  # [2, R]
    rank: int

    @classmethod
    def fit(cls, residuals: torch.Tensor) -> ResidualFit:
        if residuals.dim() != 3 or residuals.shape[1] != 2:
            raise ValueError(f"residuals must be [N, 2, R], got {list(residuals.shape)}")
        scale = torch.stack([fp8_scales(residuals[:, i]) for i in (0, 1)])  # [2, R]
        errors = tuple(measure_group_errors(residuals[:, i].contiguous(), scale[i], KINDS) for i in (0, 1))
        return cls((errors[0], errors[1]), scale, residuals.shape[2])

    def code(self, bits_per_token: int) -> ResidualCode:
        """The best K/V split of ``bits_per_token`` (both streams together) for these residuals."""
        ak, av = allocate_bits_joint(self.errors, self.rank, bits_per_token)
        return ResidualCode(ak, av, self.fp8_scale)


def code_residual(d: torch.Tensor, code: ResidualCode, deflate: ZlibDeflate) -> tuple[torch.Tensor, int]:
    """Quantize ``d [T, 2, R]`` with ``code``; returns ``(d' [T, 2, R], DEFLATE'd payload bytes)``."""
    parts, out = [], torch.zeros_like(d)
    for i, alloc in enumerate((code.keys, code.values)):
        payload = encode_coefficients(d[:, i].contiguous(), alloc, code.fp8_scale[i])  # [n] uint8
        parts.append(payload)
        out[:, i] = decode_coefficients(payload, alloc, code.fp8_scale[i], d.shape[0], d.shape[2])
    raw = torch.cat(parts)
    nbytes = sum(c.numel() for c in deflate.compress(list(torch.split(raw, 1 << 16)))) if raw.numel() else 0
    return out, nbytes


def apply_residual(codec: KVTCCodec, x_ref: tuple, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x' = x_ref + d @ D`` for K and V (``d [T, 2, R]``, padded as :func:`residual_coefficients` makes it)."""
    (_, dk), (_, dv) = _bases(codec)
    return x_ref[0] + d[:, 0, : dk.shape[0]] @ dk, x_ref[1] + d[:, 1, : dv.shape[0]] @ dv


def kvtc_payload_bytes(codec: KVTCCodec, blob: torch.Tensor) -> int:
    """DEFLATE'd payload bytes of a KVTC blob (its chunks, without the header): comparable to :func:`code_residual`."""
    return sum(c[0] for c in codec.read_header(blob).chunks)
