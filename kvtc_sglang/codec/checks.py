"""Input checks of the codec's public methods: each names the argument, the expected and the actual value."""

from __future__ import annotations

import torch

from .spec import ModelSpec

KV_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_kv(spec: ModelSpec, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
    s = spec
    want = (s.num_layers, k.shape[1] if k.dim() == 4 else -1, s.num_kv_heads, s.head_dim)
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 4 or tuple(t.shape) != want:
            raise ValueError(f"{name} must be [L, T, H, D] = {list(want)}, got {list(t.shape)}")
        if t.dtype not in KV_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    if v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
        raise ValueError(f"k and v must match: {k.shape}/{k.dtype}/{k.device} vs {v.shape}/{v.dtype}/{v.device}")
    check_positions(positions, k.shape[1])


def check_positions(positions: torch.Tensor, num_tokens: int) -> None:
    if positions.dim() != 1 or positions.numel() != num_tokens or positions.dtype.is_floating_point:
        raise ValueError(
            f"positions must be an integer [T={num_tokens}], got {positions.dtype} {list(positions.shape)}"
        )


def check_layers(spec: ModelSpec, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor]) -> None:
    s = spec
    if len(k_layers) != s.num_layers or len(v_layers) != s.num_layers:
        raise ValueError(f"need {s.num_layers} K and V layer buffers, got {len(k_layers)} and {len(v_layers)}")
    first = k_layers[0]
    for name, bufs in (("k", k_layers), ("v", v_layers)):
        for i, b in enumerate(bufs):
            if b.dim() != 3 or tuple(b.shape[1:]) != (s.num_kv_heads, s.head_dim):
                raise ValueError(
                    f"{name} layer {i} buffer must be [N, H={s.num_kv_heads}, D={s.head_dim}], got {list(b.shape)}"
                )
            if b.dtype != first.dtype or b.device != first.device:
                raise ValueError(f"{name} layer {i} buffer is {b.dtype}/{b.device}, k layer 0 is "
                                 f"{first.dtype}/{first.device}")  # fmt: skip
            if b.dtype not in KV_DTYPES:
                raise ValueError(f"{name} buffers must be float16, bfloat16 or float32, got {b.dtype}")
