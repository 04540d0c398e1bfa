"""Rotary position embedding: remove it from keys before PCA, re-apply it after decoding.

Pure functions on ``[L, T, H, D]`` tensors. The rotation is computed from the model's own settings
(:class:`RopeConfig`, written into the calibration artifact) with angles in float64, so removal
followed by re-application is exact to floating-point tolerance at any position.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_SUPPORTED_TYPES = ("default", "llama3")
_SUPPORTED_STYLES = ("neox", "gptj")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary settings of a model.

    ``style='neox'`` is the rotate-half layout of HF Llama (dims ``i`` and ``i + D/2`` pair up);
    ``style='gptj'`` pairs neighbouring dims ``2i, 2i+1``. ``rope_type='llama3'`` applies Llama 3.1
    frequency scaling with ``factor``, ``low_freq_factor``, ``high_freq_factor`` and
    ``original_max_position``.
    """

    theta: float
    rotary_dim: int
    style: str = "neox"
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in _SUPPORTED_TYPES:
            raise ValueError(f"rope_type must be one of {_SUPPORTED_TYPES}, got {self.rope_type!r}")
        if self.style not in _SUPPORTED_STYLES:
            raise ValueError(f"rope style must be one of {_SUPPORTED_STYLES}, got {self.style!r}")
        if self.rotary_dim <= 0 or self.rotary_dim % 2:
            raise ValueError(f"rotary_dim must be a positive even number, got {self.rotary_dim}")
        if self.theta <= 0:
            raise ValueError(f"rope theta must be positive, got {self.theta}")


def inv_freq(cfg: RopeConfig) -> torch.Tensor:
    """Inverse frequencies ``[rotary_dim / 2]`` in float64."""
    exponent = torch.arange(0, cfg.rotary_dim, 2, dtype=torch.float64) / cfg.rotary_dim
    freq = 1.0 / (cfg.theta**exponent)
    if cfg.rope_type == "llama3":
        low_wavelen = cfg.original_max_position / cfg.low_freq_factor
        high_wavelen = cfg.original_max_position / cfg.high_freq_factor
        wavelen = 2 * math.pi / freq
        smooth = (cfg.original_max_position / wavelen - cfg.low_freq_factor) / (
            cfg.high_freq_factor - cfg.low_freq_factor
        )
        scaled = torch.where(wavelen > low_wavelen, freq / cfg.factor, freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        freq = torch.where(mid, (1 - smooth) * freq / cfg.factor + smooth * freq, scaled)
    return freq


def cos_sin(positions: torch.Tensor, cfg: RopeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[T, 1, rotary_dim / 2]`` float32 for absolute ``positions [T]``, on their device (computed on
    the host: host positions, the cache's, move nowhere)."""
    on_host = positions.device.type == "cpu"
    angles = (positions if on_host else positions.cpu()).to(torch.float64)[:, None] * inv_freq(cfg)[None, :]  # [T, D/2]
    cos = angles.cos().to(torch.float32)[:, None, :]
    sin = angles.sin().to(torch.float32)[:, None, :]
    return (cos, sin) if on_host else (cos.to(positions.device), sin.to(positions.device))


def _rotate(
    x: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig, sign: float, *, out: torch.Tensor, token_dim: int
) -> None:
    """Rotate ``x`` (``[L, T, H, D]`` with ``token_dim=1``, or ``[T, L, H, D]`` with ``token_dim=0``; any float
    dtype, any strides; 4-D, checked by :func:`_per_layer`, its one caller) by ``sign`` times each token's angles
    into ``out`` (same shape, float32).

    Four fused passes over the rotary half-planes (``mul`` then ``addcmul_``), no temporaries.
    """
    if positions.shape != (x.shape[token_dim],):
        raise ValueError(f"positions must be [T={x.shape[token_dim]}], got shape {tuple(positions.shape)}")
    if cfg.rotary_dim > x.shape[-1]:
        raise ValueError(f"rotary_dim {cfg.rotary_dim} exceeds head_dim {x.shape[-1]}")
    cos, sin = cos_sin(positions, cfg)  # [T, 1, D/2] each
    if token_dim == 0:
        cos, sin = cos[:, None], sin[:, None]  # [T, 1, 1, D/2]: broadcast over L and H
    rd, half = cfg.rotary_dim, cfg.rotary_dim // 2
    if cfg.style == "neox":
        x1, x2, o1, o2 = x[..., :half], x[..., half:rd], out[..., :half], out[..., half:rd]
    else:  # gptj: interleaved pairs
        x1, x2, o1, o2 = x[..., 0:rd:2], x[..., 1:rd:2], out[..., 0:rd:2], out[..., 1:rd:2]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-sign)  # y1 = x1 cos - sign x2 sin
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=sign)  # y2 = x2 cos + sign x1 sin
    if rd < x.shape[-1]:
        out[..., rd:] = x[..., rd:]


def _per_layer(
    x: torch.Tensor,
    positions: torch.Tensor,
    ropes: RopeConfig | Sequence[RopeConfig],
    sign: float,
    tokens_first: bool = False,
) -> torch.Tensor:
    """``x [L, T, H, D]`` rotated -> float32 ``[L, T, H, D]``, or ``[T, L, H, D]`` contiguous if ``tokens_first``
    (the ``[T, F]`` feature layout of the codec, without a separate transpose pass)."""
    if x.dim() != 4:
        raise ValueError(f"keys must be [L, T, H, D], got shape {tuple(x.shape)}")
    src = x.permute(1, 0, 2, 3) if tokens_first else x  # [T, L, H, D] view or [L, T, H, D]
    out = torch.empty(src.shape, dtype=torch.float32, device=x.device)
    token_dim, layer_dim = (0, 1) if tokens_first else (1, 0)
    if isinstance(ropes, RopeConfig):
        _rotate(src, positions, ropes, sign, out=out, token_dim=token_dim)
        return out
    if len(ropes) != x.shape[0]:
        raise ValueError(f"need one RoPE config per layer ({x.shape[0]}), got {len(ropes)}")
    for cfg in dict.fromkeys(ropes):  # each distinct config once, over the layers that use it
        idx = torch.tensor([i for i, c in enumerate(ropes) if c == cfg], device=x.device)
        shape = list(out.shape)
        shape[layer_dim] = idx.numel()
        part = torch.empty(shape, dtype=torch.float32, device=x.device)
        _rotate(src.index_select(layer_dim, idx), positions, cfg, sign, out=part, token_dim=token_dim)
        out.index_copy_(layer_dim, idx, part)
    return out


def apply_rope(
    k: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig | Sequence[RopeConfig], tokens_first: bool = False
) -> torch.Tensor:
    """Rotate pre-RoPE keys ``[L, T, H, D]`` to ``positions [T]``; returns float32 ``[L, T, H, D]``
    (``[T, L, H, D]`` if ``tokens_first``).

    ``cfg`` is one config for every layer, or one per layer (models such as Gemma 3 use different
    RoPE bases for sliding-window and global layers).
    """
    return _per_layer(k, positions, cfg, 1.0, tokens_first)


def remove_rope(
    k: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig | Sequence[RopeConfig], tokens_first: bool = False
) -> torch.Tensor:
    """Undo :func:`apply_rope`: post-RoPE keys ``[L, T, H, D]`` -> float32 pre-RoPE keys ``[L, T, H, D]``
    (``[T, L, H, D]`` if ``tokens_first``)."""
    return _per_layer(k, positions, cfg, -1.0, tokens_first)
