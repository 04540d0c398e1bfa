"""Offline calibration: collect real K/V, fit cross-layer PCA, run the DP bit allocation.

One pass of the model over the calibration text feeds a covariance accumulator per stream; every
``holdout_every``-th sequence is held out to measure the real quantization error of each candidate
group for the DP. One artifact is written per target ratio, all sharing the same PCA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ..codec.allocation import Allocation
from ..codec.artifact import CalibrationArtifact, StreamCalibration
from ..codec.quant import FP8_MAX
from ..codec.rope import remove_rope
from .bitalloc import allocate_bits, allocate_bits_joint, measure_group_errors
from .corpus import token_sequences
from .model import LoadedModel, prefill_kv
from .pca import CovarianceAccumulator, PCAFit

KINDS = ("int2", "int4", "int8", "fp8")


@dataclass(frozen=True)
class CalibrationConfig:
    """How much text to read and what to produce."""

    tokens: int = 100_000
    seq_len: int = 2048
    edge_tokens: int = 128  # skipped at both ends of each sequence (sinks and the unfinished tail)
    holdout_every: int = 8  # every n-th sequence measures the DP's errors instead of fitting the PCA
    ratios: tuple[float, ...] = (16.0,)
    normalize_heads: bool = True  # divide each layer-head block by its RMS before PCA
    joint_budget: bool = False  # one budget shared by K and V; measured worse on KL (BENCHMARKS.md)

    def __post_init__(self) -> None:
        if self.seq_len <= 2 * self.edge_tokens:
            raise ValueError(f"seq_len {self.seq_len} must exceed twice edge_tokens {self.edge_tokens}")
        if self.tokens < 2 * self.seq_len:
            raise ValueError(f"tokens {self.tokens} must cover at least 2 sequences of {self.seq_len}")
        if not self.ratios or min(self.ratios) <= 1.0:
            raise ValueError(f"ratios must be > 1, got {self.ratios}")
        if self.holdout_every < 2:
            raise ValueError(f"holdout_every must be >= 2, got {self.holdout_every}")


@dataclass(frozen=True)
class StreamFit:
    """PCA of one stream plus the held-out group errors the DP needs."""

    pca: PCAFit
    fp8_scale: torch.Tensor  # [F]
    errors: dict

    def calibration(self, alloc: Allocation) -> StreamCalibration:
        r = alloc.rank
        return StreamCalibration(
            mean=self.pca.mean,
            scale=self.pca.scale,
            basis=self.pca.basis[:, :r].contiguous(),
            fp8_scale=self.fp8_scale[:r].contiguous(),
            variance=self.pca.variance,
            allocation=alloc,
        )


def allocate(fits: dict[str, StreamFit], ratio: float, joint: bool) -> tuple[StreamCalibration, StreamCalibration]:
    """K and V calibrations at ``ratio``: ``16 * F / ratio`` bits per token per stream on average."""
    f = fits["k"].pca.mean.shape[0]
    per_stream = round(16 * f / ratio)
    if joint:
        ak, av = allocate_bits_joint((fits["k"].errors, fits["v"].errors), f, 2 * per_stream)
    else:
        ak, av = (allocate_bits(fits[s].errors, f, per_stream) for s in ("k", "v"))
    return fits["k"].calibration(ak), fits["v"].calibration(av)


def _fit_stream(acc: CovarianceAccumulator, heldout: torch.Tensor, block: int) -> StreamFit:
    pca = acc.fit(block)
    coeffs = ((heldout - pca.mean) / pca.scale) @ pca.basis  # [N, F]
    fp8_scale = (2.0 * coeffs.abs().amax(dim=0) / FP8_MAX).clamp(min=1e-8)  # 2x headroom over held-out max
    return StreamFit(pca, fp8_scale, measure_group_errors(coeffs, fp8_scale, KINDS))


def calibrate(lm: LoadedModel, cfg: CalibrationConfig, out_dir: Path, show_progress: bool = True) -> list[Path]:
    """Run calibration and write one artifact per ratio into ``out_dir``; returns their paths."""
    t0 = time.perf_counter()
    spec = lm.spec
    seqs, names = [], {}
    for kind in ("prose", "code"):
        s, n = token_sequences(lm.tokenizer, "calibration", kind, cfg.seq_len, cfg.tokens // 2)
        seqs.extend(s)
        names[kind] = n
    acc = {"k": CovarianceAccumulator(spec.num_features), "v": CovarianceAccumulator(spec.num_features)}
    held: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    keep = slice(cfg.edge_tokens, cfg.seq_len - cfg.edge_tokens)
    positions = torch.arange(cfg.seq_len)
    order = [seqs[i // 2 + (len(seqs) + 1) // 2 * (i % 2)] for i in range(len(seqs))]  # interleave prose/code
    for i, ids in enumerate(tqdm(order, desc="calibration: collect K/V", disable=not show_progress)):
        k, v, _ = prefill_kv(lm.model, ids)  # [L, T, H, D]
        k_un = remove_rope(k, positions, spec.ropes)[:, keep]  # [L, T', H, D] float32
        xk = k_un.permute(1, 0, 2, 3).reshape(k_un.shape[1], -1)  # [T', F]
        xv = v[:, keep].float().permute(1, 0, 2, 3).reshape(k_un.shape[1], -1)  # [T', F]
        if i % cfg.holdout_every == cfg.holdout_every - 1:
            held["k"].append(xk)
            held["v"].append(xv)
        else:
            acc["k"].update(xk)
            acc["v"].update(xv)
    t_collect = time.perf_counter() - t0
    fits = {}
    for s in tqdm(("k", "v"), desc="calibration: PCA + group errors", disable=not show_progress):
        fits[s] = _fit_stream(acc[s], torch.cat(held[s]), spec.head_dim if cfg.normalize_heads else 1)
    t_fit = time.perf_counter() - t0 - t_collect
    paths = []
    for ratio in tqdm(cfg.ratios, desc="calibration: DP bit allocation", disable=not show_progress):
        info = {
            "corpus": {
                "source": "pydoc_data.topics (prose) + CPython stdlib *.py (code)",
                "documents": names,
                "split": "calibration",
                "disjoint_from": "evaluation split (crc32(name) % 4 == 0)",
            },
            "tokens_fit": acc["k"].num_tokens,
            "tokens_heldout": int(sum(x.shape[0] for x in held["k"])),
            "seq_len": cfg.seq_len,
            "normalize_heads": cfg.normalize_heads,
            "joint_budget": cfg.joint_budget,
            "edge_tokens_skipped": cfg.edge_tokens,
            "seconds": {"collect": round(t_collect, 1), "pca_and_errors": round(t_fit, 1)},
        }
        keys, values = allocate(fits, ratio, cfg.joint_budget)
        art = CalibrationArtifact(spec=spec, keys=keys, values=values, target_ratio=float(ratio), info=info)
        paths.append(art.save(out_dir / artifact_name(spec.name, ratio)))
    return paths


def artifact_name(model_name: str, ratio: float) -> str:
    """File name of the artifact of ``model_name`` at ``ratio``, e.g. ``smollm2-135m-instruct.r16.kvtc.safetensors``."""
    return f"{model_name}.r{ratio:g}.kvtc.safetensors"
