"""Both streams of one segment through the kernels: what :class:`~kvtc_sglang.codec.KVTCCodec` calls.

``streams`` is the codec's per-device pair (keys, values), each with ``mean [F]``, ``enc_basis [F, R]``,
``dec_basis [R, F]``, ``fp8_scale [R]`` (fp32) and ``plan`` (:class:`~.plan.StreamPlan`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..codec.spec import ModelSpec
from .common import LayerTable
from .decode import decode_into
from .project import project
from .quant_pack import quant_pack


def _tables(
    spec: ModelSpec, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor]
) -> tuple[LayerTable, LayerTable]:
    if len(k_layers) != spec.num_layers or len(v_layers) != spec.num_layers:
        raise ValueError(f"need {spec.num_layers} K and V layer buffers, got {len(k_layers)} and {len(v_layers)}")
    tk = LayerTable(k_layers, spec.num_kv_heads, spec.head_dim)
    tv = LayerTable(v_layers, spec.num_kv_heads, spec.head_dim)
    if tv.dtype != tk.dtype or tv.device != tk.device:
        raise ValueError(f"K and V buffers must match: {tk.dtype}/{tk.device} vs {tv.dtype}/{tv.device}")
    return tk, tv


def encode_payload(
    spec: ModelSpec,
    streams: tuple[Any, Any],
    k_layers: list[torch.Tensor],
    v_layers: list[torch.Tensor],
    slots: torch.Tensor,
    positions: torch.Tensor,
    precision: str = "ieee",
) -> torch.Tensor:
    """Raw payload ``[nbytes_k + nbytes_v]`` uint8 of the rows ``slots`` of ``L x [N, H, D]`` K/V buffers."""
    tk, tv = _tables(spec, k_layers, v_layers)
    sk, sv = streams
    num_t = slots.numel()
    nk = sk.plan.nbytes(num_t)
    payload = torch.empty(nk + sv.plan.nbytes(num_t), dtype=torch.uint8, device=tk.device)  # caller-sized
    ck = project(tk, slots, sk.mean, sk.enc_basis, spec.ropes, positions, precision=precision)  # [T, R_k]
    quant_pack(ck, sk.plan, sk.fp8_scale, out=payload[:nk])
    cv = project(tv, slots, sv.mean, sv.enc_basis, None, precision=precision)  # [T, R_v] fp32
    quant_pack(cv, sv.plan, sv.fp8_scale, out=payload[nk:])
    return payload


def decode_payload(
    spec: ModelSpec,
    streams: tuple[Any, Any],
    payload: torch.Tensor,
    k_layers: list[torch.Tensor],
    v_layers: list[torch.Tensor],
    slots: torch.Tensor,
    positions: torch.Tensor,
    precision: str = "ieee",
) -> None:
    """Write the tokens of ``payload`` into rows ``slots`` of ``L x [N, H, D]`` K/V buffers."""
    tk, tv = _tables(spec, k_layers, v_layers)
    sk, sv = streams
    nk = sk.plan.nbytes(slots.numel())
    decode_into(payload[:nk], sk.plan, sk.fp8_scale, sk.dec_basis, sk.mean, spec.ropes, positions, tk, slots, precision)
    decode_into(payload[nk:], sv.plan, sv.fp8_scale, sv.dec_basis, sv.mean, None, None, tv, slots, precision)
