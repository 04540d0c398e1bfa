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
    """cos, sin ``[T, 1, rotary_dim / 2]`` float32 for absolute ``positions [T]``."""
    angles = positions.to(torch.float64).cpu()[:, None] * inv_freq(cfg)[None, :]  # [T, D/2]
    cos = angles.cos().to(torch.float32)[:, None, :].to(positions.device)
    sin = angles.sin().to(torch.float32)[:, None, :].to(positions.device)
    return cos, sin


def _rotate(x: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig, sign: float) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"keys must be [L, T, H, D], got shape {tuple(x.shape)}")
    if positions.shape != (x.shape[1],):
        raise ValueError(f"positions must be [T={x.shape[1]}], got shape {tuple(positions.shape)}")
    if cfg.rotary_dim > x.shape[-1]:
        raise ValueError(f"rotary_dim {cfg.rotary_dim} exceeds head_dim {x.shape[-1]}")
    cos, sin = cos_sin(positions, cfg)
    sin = sign * sin
    xf = x.to(torch.float32)
    rot, rest = xf[..., : cfg.rotary_dim], xf[..., cfg.rotary_dim :]
    half = cfg.rotary_dim // 2
    if cfg.style == "neox":
        x1, x2 = rot[..., :half], rot[..., half:]  # [L, T, H, D/2] each
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if cfg.style == "neox":
        out = torch.cat([y1, y2], dim=-1)
    else:
        out = torch.stack([y1, y2], dim=-1).flatten(-2)  # [L, T, H, rotary_dim] interleaved
    return torch.cat([out, rest], dim=-1) if rest.numel() else out


def _per_layer(x: torch.Tensor, positions: torch.Tensor, ropes: RopeConfig | Sequence[RopeConfig], sign: float):
    if isinstance(ropes, RopeConfig):
        return _rotate(x, positions, ropes, sign)
    if len(ropes) != x.shape[0]:
        raise ValueError(f"need one RoPE config per layer ({x.shape[0]}), got {len(ropes)}")
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    for cfg in dict.fromkeys(ropes):  # each distinct config once, over the layers that use it
        idx = torch.tensor([i for i, c in enumerate(ropes) if c == cfg], device=x.device)
        out[idx] = _rotate(x[idx], positions, cfg, sign)
    return out


def apply_rope(k: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig | Sequence[RopeConfig]) -> torch.Tensor:
    """Rotate pre-RoPE keys ``[L, T, H, D]`` to ``positions [T]``; returns float32 ``[L, T, H, D]``.

    ``cfg`` is one config for every layer, or one per layer (models such as Gemma 3 use different
    RoPE bases for sliding-window and global layers).
    """
    return _per_layer(k, positions, cfg, 1.0)


def remove_rope(k: torch.Tensor, positions: torch.Tensor, cfg: RopeConfig | Sequence[RopeConfig]) -> torch.Tensor:
    """Undo :func:`apply_rope`: post-RoPE keys ``[L, T, H, D]`` -> float32 pre-RoPE keys."""
    return _per_layer(k, positions, cfg, -1.0)
