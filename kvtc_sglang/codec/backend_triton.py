"""The Triton payload backend: the codec's adapter onto :mod:`kvtc_sglang.triton_kernels`.

Imported by the codec only when it selects the Triton path (``kernels="triton"``, or ``"auto"`` and a
CUDA device): the kernels are an optional dependency of the codec, and they import nothing from it.
This module translates the codec's vocabulary (``RopeConfig``, ``Allocation``) into the kernels' plain
inputs (:class:`~kvtc_sglang.triton_kernels.RopeTables`, :class:`~kvtc_sglang.triton_kernels.StreamPlan`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from ..devcopy import to_device
from ..triton_kernels import DOT_PRECISIONS, LayerTable, RopeTables, StreamPlan, decode_into, project, quant_pack
from .backend import DeviceStreams, decode_by_rows
from .rope import RopeConfig, cos_sin
from .spec import ModelSpec

__all__ = ["DOT_PRECISIONS", "TritonBackend", "check_dot_precision", "rope_tables"]

MAX_LAYER_TABLES = 8  # pointer tables kept per backend (a pool's buffers, plus a few decode() temporaries)


def check_dot_precision(precision: str) -> str:
    """``precision`` if the kernels support it (:data:`DOT_PRECISIONS`), else ``ValueError``."""
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {precision!r}")
    return precision


def rope_tables(rope: RopeConfig | Sequence[RopeConfig], positions: torch.Tensor, device: torch.device) -> RopeTables:
    """The kernels' cos/sin ``[L', T, rotary_dim / 2]`` fp32 tables (``L' = 1`` when all layers share one RoPE).

    Angles are computed in float64 exactly as the torch path's :func:`~.rope.apply_rope` does.
    """
    ropes = list(dict.fromkeys([rope] if isinstance(rope, RopeConfig) else rope))
    if len({(r.rotary_dim, r.style) for r in ropes}) != 1:
        raise ValueError(f"per-layer RoPE configs must share rotary_dim and style, got {set(ropes)}")
    per_layer = [rope] if isinstance(rope, RopeConfig) else list(rope)
    if len(ropes) == 1:
        per_layer = per_layer[:1]
    host = to_device(positions, torch.device("cpu"))  # the cache's positions are host tensors: no copy
    tables = {r: cos_sin(host, r) for r in ropes}  # [T, 1, rotary/2] each
    cos = to_device(torch.stack([tables[r][0][:, 0] for r in per_layer]).contiguous(), device)  # [L', T, rotary/2]
    sin = to_device(torch.stack([tables[r][1][:, 0] for r in per_layer]).contiguous(), device)  # pinned: no wait
    return RopeTables(cos, sin, ropes[0].rotary_dim, ropes[0].style == "gptj")


class TritonBackend:
    """Fused kernels on CUDA (or under ``TRITON_INTERPRET=1``): pool rows are read and written in place."""

    def __init__(self, spec: ModelSpec, streams: DeviceStreams, precision: str) -> None:
        self.spec = spec
        self.streams = streams
        self.precision = check_dot_precision(precision)
        device = streams.keys.mean.device
        self.plans = tuple(
            StreamPlan.build(s.cal.allocation.coded_groups(), s.rank, device) for s in (streams.keys, streams.values)
        )
        self._lock = threading.Lock()  # the encode worker and the scheduler thread share the table cache
        self._layer_tables: dict[tuple, tuple[LayerTable, LayerTable]] = {}

    def _tables(self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor]) -> tuple[LayerTable, LayerTable]:
        """The pointer tables of these buffers, made once per buffer set (the KV pool's are made at its first
        encode or restore and reused: no pointer copy per call)."""
        s = self.spec
        if len(k_layers) != s.num_layers or len(v_layers) != s.num_layers:
            raise ValueError(f"need {s.num_layers} K and V layer buffers, got {len(k_layers)} and {len(v_layers)}")
        key = tuple((b.data_ptr(), b.shape[0], b.stride(0), b.dtype) for b in (*k_layers, *v_layers))
        with self._lock:
            cached = self._layer_tables.get(key)
        if cached is not None:
            for table in cached:  # made on another stream, maybe; the cache may drop it while this stream reads it
                if table.ptrs.is_cuda:
                    table.ptrs.record_stream(torch.cuda.current_stream(table.ptrs.device))
            return cached
        tk = LayerTable(k_layers, s.num_kv_heads, s.head_dim)
        tv = LayerTable(v_layers, s.num_kv_heads, s.head_dim)
        if tv.dtype != tk.dtype or tv.device != tk.device:
            raise ValueError(f"K and V buffers must match: {tk.dtype}/{tk.device} vs {tv.dtype}/{tv.device}")
        with self._lock:
            if len(self._layer_tables) >= MAX_LAYER_TABLES:  # temporary buffers (decode()) come and go
                self._layer_tables.pop(next(iter(self._layer_tables)))
            self._layer_tables[key] = (tk, tv)
        return tk, tv

    def encode_rows(
        self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor], slots: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        tk, tv = self._tables(k_layers, v_layers)
        (sk, sv), (pk, pv) = (self.streams.keys, self.streams.values), self.plans
        num_t = slots.numel()
        nk = pk.nbytes(num_t)
        payload = torch.empty(nk + pv.nbytes(num_t), dtype=torch.uint8, device=tk.device)  # [nbytes_k + nbytes_v]
        rope = rope_tables(self.spec.ropes, positions, tk.device)
        ck = project(tk, slots, sk.mean, sk.enc_basis, rope, precision=self.precision)  # [T, R_k] fp32
        quant_pack(ck, pk, sk.fp8_scale, out=payload[:nk])
        cv = project(tv, slots, sv.mean, sv.enc_basis, None, precision=self.precision)  # [T, R_v] fp32
        quant_pack(cv, pv, sv.fp8_scale, out=payload[nk:])
        return payload

    def decode_rows(
        self,
        payload: torch.Tensor,
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        tk, tv = self._tables(k_layers, v_layers)
        (sk, sv), (pk, pv) = (self.streams.keys, self.streams.values), self.plans
        nk = pk.nbytes(slots.numel())
        rope = rope_tables(self.spec.ropes, positions, tk.device)
        decode_into(payload[:nk], pk, sk.fp8_scale, sk.dec_basis, sk.mean, rope, tk, slots, self.precision)
        decode_into(payload[nk:], pv, sv.fp8_scale, sv.dec_basis, sv.mean, None, tv, slots, self.precision)

    def encode(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        slots = torch.arange(k.shape[1], device=k.device)
        return self.encode_rows(list(k.contiguous().unbind(0)), list(v.contiguous().unbind(0)), slots, positions)

    def decode(
        self, payload: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_by_rows(self, self.spec, payload, positions, dtype)
