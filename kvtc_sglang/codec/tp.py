"""Tensor parallelism: which of the model's KV heads each rank's pool holds, and one rank's features.

Under ``--tp N`` SGLang splits the KV heads across ranks, and each rank's pool holds ``[T, H_r, D]`` per
layer. Two layouts (sglang 0.5.23):

* the CPU engine (``adjust_config_with_unaligned_cpu_tp``, ``srt/configs/update_config.py``): when the
  head counts do not divide by ``N``, the KV heads are padded with zero-weight heads up to a multiple of
  ``N`` (SmolLM2's 3 KV heads become 4 at tp 2: rank 1 holds head 2 and a zero head), then split evenly;
* the GPU engine (``QKVParallelLinear``, ``srt/layers/linear.py``): ``H >= N`` heads split evenly (``H``
  must divide by ``N``), fewer heads are replicated: rank ``r`` holds head ``r // (N // H)``.

A rank's codec sees ``F_r = L * H_r * D`` features, ordered ``(L, H_r, D)`` like the full model's.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .spec import ModelSpec

LAYOUTS = ("cpu", "gpu")
PAD = -1  # a zero head padded in by the CPU engine


def rank_kv_heads(total: int, tp_size: int, tp_rank: int, layout: str = "cpu") -> tuple[int, ...]:
    """The model's KV head in each of rank ``tp_rank``'s pool heads (``PAD`` for a zero head)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if total < 1 or tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"need total >= 1, tp_size >= 1, 0 <= tp_rank < tp_size; got {total}, {tp_size}, {tp_rank}")
    if layout == "cpu":
        per = -(-total // tp_size)  # ceil: heads padded up to a multiple of tp_size
        return tuple(h if h < total else PAD for h in range(tp_rank * per, (tp_rank + 1) * per))
    if total >= tp_size:
        if total % tp_size:
            raise ValueError(f"the GPU engine needs the KV heads ({total}) to divide by tp_size ({tp_size})")
        per = total // tp_size
        return tuple(range(tp_rank * per, (tp_rank + 1) * per))
    if tp_size % total:
        raise ValueError(f"the GPU engine replicates {total} KV heads only when they divide tp_size ({tp_size})")
    return (tp_rank // (tp_size // total),)


def rank_spec(spec: ModelSpec, tp_size: int, tp_rank: int, layout: str = "cpu") -> ModelSpec:
    """``spec`` (the whole model's, ``tp_size == 1``) as rank ``tp_rank``'s pool sees it."""
    if spec.tp_size != 1:
        raise ValueError(f"rank_spec takes the whole model's spec (tp_size 1), got tp_size {spec.tp_size}")
    if tp_size == 1:
        return spec
    heads = rank_kv_heads(spec.num_kv_heads, tp_size, tp_rank, layout)
    return replace(spec, num_kv_heads=len(heads), tp_rank=tp_rank, tp_size=tp_size, tp_heads=heads)


def feature_index(spec: ModelSpec, heads: tuple[int, ...]) -> torch.Tensor:
    """``[F_r]`` int64: the whole model's feature behind each of a rank's features (``PAD`` for a zero head).

    ``spec`` is the whole model's; features are ordered ``(L, H, D)`` on both sides.
    """
    d = spec.head_dim
    layer = torch.arange(spec.num_layers)[:, None, None]  # [L, 1, 1]
    head = torch.tensor(heads)[None, :, None]  # [1, H_r, 1]
    dim = torch.arange(d)[None, None, :]  # [1, 1, D]
    idx = (layer * spec.num_kv_heads + head) * d + dim  # [L, H_r, D]
    return torch.where(head == PAD, torch.full_like(idx, PAD), idx).reshape(-1)  # [F_r]


def take_features(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [..., F]`` -> ``[..., F_r]``: a rank's features, zeros where ``index`` is ``PAD``."""
    out = x[..., index.clamp(min=0)]
    return out.masked_fill(index == PAD, 0)


def split_heads(x: torch.Tensor, heads: tuple[int, ...], dim: int = 2) -> torch.Tensor:
    """``x [L, T, H, D]`` (the whole model's heads on ``dim``) -> ``[L, T, H_r, D]`` as a rank's pool holds
    them: the heads ``heads`` names, zeros for ``PAD``."""
    idx = torch.tensor([max(h, 0) for h in heads], device=x.device)
    out = x.index_select(dim, idx)  # [L, T, H_r, D]
    shape = [1] * x.dim()
    shape[dim] = len(heads)
    pad = torch.tensor([h == PAD for h in heads], device=x.device).reshape(shape)
    return out.masked_fill(pad, 0)


ARTIFACT_SUFFIX = ".kvtc.safetensors"


def tp_suffix(tp_size: int, tp_rank: int) -> str:
    """The part of an artifact's file name that names its rank: ``.tp2-rank1``; empty at ``tp_size == 1``."""
    return f".tp{tp_size}-rank{tp_rank}" if tp_size > 1 else ""


def rank_artifact_path(path: str | Path, tp_size: int, tp_rank: int, suffix: str = ARTIFACT_SUFFIX) -> Path:
    """The artifact rank ``tp_rank`` of ``tp_size`` loads, given the whole model's (``tp_size == 1``) artifact
    ``path``: the one calibration writes beside it (``m.r16.kvtc.safetensors`` ->
    ``m.r16.tp2-rank1.kvtc.safetensors``); ``path`` itself at ``tp_size == 1``. ``suffix``: the end of the name
    the rank's part goes before (``.safetensors`` for a residual calibration: ``m.r8.residual.safetensors`` ->
    ``m.r8.residual.tp2-rank1.safetensors``)."""
    path = Path(path)
    if tp_size == 1:
        return path
    if not path.name.endswith(suffix):
        raise ValueError(f"a calibration artifact's name ends with {suffix}, got {path.name!r}")
    stem = path.name[: -len(suffix)]
    if ".tp" in stem and "-rank" in stem:
        raise ValueError(
            f"give the whole model's artifact (tp 1) at --tp-size {tp_size}, not a rank's: {path.name!r}"
        )
    return path.with_name(stem + tp_suffix(tp_size, tp_rank) + suffix)
