"""Offline calibration: collect real K/V, fit cross-layer PCA, run the DP bit allocation.

One pass of the model over the calibration text feeds a covariance accumulator per stream; every
``holdout_every``-th sequence is held out to measure the real quantization error of each candidate
group for the DP. One artifact is written per target ratio, all sharing the same PCA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from ..codec.allocation import Allocation
from ..codec.artifact import CalibrationArtifact, StreamCalibration
from ..codec.quant import FP8_MAX
from ..codec.rope import remove_rope
from ..codec.tp import ARTIFACT_SUFFIX, tp_suffix
from .bitalloc import allocate_bits, allocate_bits_joint, measure_group_errors
from .corpus import EVAL_ONLY_KINDS, SOURCES, token_sequences
from .corpus import KINDS as DOMAINS
from .fisher import FisherMoments
from .metric import QueryMoments, key_metric_diag, metric_scale, value_metric_diag
from .model import LoadedModel, kv_dtype, prefill_kv
from .pca import CovarianceAccumulator, PCAFit

KINDS = ("int2", "int4", "int8", "fp8")
# per-layer-head RMS; the attention metric of the model's queries; the diagonal Fisher (KL sensitivity)
KEY_SCALES = ("rms", "query", "fisher")
VALUE_SCALES = ("rms", "wo", "fisher")  # per-layer-head RMS; the diagonal of W_o,h^T W_o,h; the diagonal Fisher


@dataclass(frozen=True)
class CalibrationConfig:
    """How much text to read and what to produce."""

    tokens: int = 100_000
    seq_len: int = 2048
    edge_tokens: int = 128  # skipped at both ends of each sequence (sinks and the unfinished tail)
    holdout_every: int = 8  # every n-th sequence measures the DP's errors instead of fitting the PCA
    ratios: tuple[float, ...] = (16.0,)
    normalize_heads: bool = True  # divide each layer-head block by its RMS before PCA
    # One bit budget shared by K and V: needs errors in common units (the Fisher scales); with the RMS
    # scales it was worse on KL (docs/history/accuracy.md, "Attention-aware transform coding")
    joint_budget: bool = True
    key_scale: str = "fisher"  # see KEY_SCALES, calibration/metric.py and calibration/fisher.py
    value_scale: str = "fisher"  # see VALUE_SCALES
    basis_bf16: bool = False  # round the basis to bfloat16 (accuracy test of a half-size artifact)
    fisher_continuation: int = 128  # sampled tokens per sequence for the Fisher diagonal (used by "fisher")
    fisher_every: int = 1  # the Fisher's backward pass on every n-th fit sequence only (its cost: ~30% of a pass)
    domains: tuple[str, ...] = ("prose", "code")  # calibration text kinds, equal shares (corpus.py)

    def __post_init__(self) -> None:
        if self.seq_len <= 2 * self.edge_tokens:
            raise ValueError(f"seq_len {self.seq_len} must exceed twice edge_tokens {self.edge_tokens}")
        if self.holdout_every < 2:
            raise ValueError(f"holdout_every must be >= 2, got {self.holdout_every}")
        if self.tokens < self.holdout_every * self.seq_len:  # else no sequence is held out for the DP's errors
            raise ValueError(
                f"tokens {self.tokens} must cover at least holdout_every = {self.holdout_every} sequences of "
                f"{self.seq_len} (>= {self.holdout_every * self.seq_len} tokens)"
            )
        if not self.ratios or min(self.ratios) <= 1.0:
            raise ValueError(f"ratios must be > 1, got {self.ratios}")
        if self.key_scale not in KEY_SCALES or self.value_scale not in VALUE_SCALES:
            raise ValueError(
                f"key_scale must be one of {KEY_SCALES} and value_scale one of {VALUE_SCALES}, "
                f"got {self.key_scale!r}, {self.value_scale!r}"
            )
        bad = [d for d in self.domains if d not in DOMAINS or d in EVAL_ONLY_KINDS]
        if not self.domains or bad or len(set(self.domains)) != len(self.domains):
            allowed = tuple(d for d in DOMAINS if d not in EVAL_ONLY_KINDS)
            raise ValueError(f"domains must be distinct kinds from {allowed}, got {self.domains}")
        if "fisher" in (self.key_scale, self.value_scale) and self.fisher_continuation == 0:
            raise ValueError("key_scale/value_scale 'fisher' needs fisher_continuation > 0 (sampled tokens)")
        if not isinstance(self.fisher_every, int) or self.fisher_every < 1:
            raise ValueError(f"fisher_every must be an integer >= 1, got {self.fisher_every!r}")
        if not 0 <= self.fisher_continuation <= self.seq_len - 2 * self.edge_tokens:
            raise ValueError(
                f"fisher_continuation must be in [0, seq_len - 2 * edge_tokens = "
                f"{self.seq_len - 2 * self.edge_tokens}], got {self.fisher_continuation}"
            )


@dataclass(frozen=True)
class StreamFit:
    """PCA of one stream plus the held-out group errors the DP needs."""

    pca: PCAFit
    fp8_scale: torch.Tensor  # [F]
    errors: dict
    basis_bf16: bool = False

    def calibration(self, alloc: Allocation) -> StreamCalibration:
        r = alloc.rank
        basis = self.pca.basis[:, :r].contiguous()  # [F, R]
        if self.basis_bf16:
            basis = basis.to(torch.bfloat16).float()
        return StreamCalibration(
            mean=self.pca.mean,
            scale=self.pca.scale,
            basis=basis,
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


def fp8_scales(coeffs: torch.Tensor) -> torch.Tensor:
    """Per-component fp8 scale ``[R]`` of held-out coefficients ``[N, R]``: 2x headroom over their largest value."""
    return (2.0 * coeffs.abs().amax(dim=0) / FP8_MAX).clamp(min=1e-8)


def _fit_stream(pca: PCAFit, heldout: torch.Tensor, bf16: bool) -> StreamFit:
    basis = pca.basis.to(torch.bfloat16).float() if bf16 else pca.basis  # [F, F]
    coeffs = ((heldout - pca.mean) / pca.scale) @ basis  # [N, F]
    fp8_scale = fp8_scales(coeffs)
    return StreamFit(pca, fp8_scale, measure_group_errors(coeffs, fp8_scale, KINDS), bf16)


def stream_scales(lm: LoadedModel, cfg: CalibrationConfig, col: Collected) -> dict[str, torch.Tensor | None]:
    """Per-feature scale ``[F]`` float32 of each stream (``None``: per-layer-head RMS, computed by the PCA).

    Fisher scales of both streams share one normalisation, so K and V errors stay in the same (KL) units.
    """
    spec = lm.spec
    ropes = list(spec.layer_ropes) or [spec.rope] * spec.num_layers
    scales: dict[str, torch.Tensor | None] = {"k": None, "v": None}
    if "fisher" in (cfg.key_scale, cfg.value_scale) and col.fisher is None:
        raise ValueError("a 'fisher' scale needs statistics collected with fisher_continuation > 0")
    fisher_mean = None
    if col.fisher is not None:
        fisher_mean = float(torch.cat([col.fisher.diag("k").flatten(), col.fisher.diag("v").flatten()]).mean())
    if cfg.key_scale == "query":
        scales["k"] = metric_scale(key_metric_diag(col.queries.second_moment(), ropes, cfg.seq_len))
    if cfg.value_scale == "wo":
        scales["v"] = metric_scale(value_metric_diag(lm.model, spec))
    for s, name in (("k", cfg.key_scale), ("v", cfg.value_scale)):
        if name == "fisher" and col.fisher is not None:
            scales[s] = metric_scale(col.fisher.diag(s), mean=fisher_mean)
    return scales


@dataclass(frozen=True)
class Collected:
    """What one pass of the model over the calibration text gathered (fit and held-out K/V, queries)."""

    acc: dict  # {"k"|"v": CovarianceAccumulator}
    held: dict  # {"k"|"v": list of [T', F] float32}
    queries: QueryMoments
    names: dict  # {kind: document names}
    seconds: float
    fisher: FisherMoments | None = None  # with fisher_continuation > 0
    phases: dict = field(default_factory=dict)  # seconds of the collect's parts: forward, fisher, covariance


def calibrate(lm: LoadedModel, cfg: CalibrationConfig, out_dir: Path, show_progress: bool = True) -> list[Path]:
    """Run calibration and write one artifact per ratio into ``out_dir``; returns their paths."""
    return write_artifacts(lm, cfg, collect(lm, cfg, show_progress), out_dir, show_progress)


def collect(lm: LoadedModel, cfg: CalibrationConfig, show_progress: bool = True) -> Collected:
    """Run the model over the calibration text once; the result can be fitted with several settings."""
    t0 = time.perf_counter()
    spec = lm.spec
    per_kind, names = [], {}
    for kind in cfg.domains:
        s, n = token_sequences(lm.tokenizer, "calibration", kind, cfg.seq_len, cfg.tokens // len(cfg.domains))
        per_kind.append(s)
        names[kind] = n
    acc = {"k": CovarianceAccumulator(spec.num_features), "v": CovarianceAccumulator(spec.num_features)}
    held: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    keep = slice(cfg.edge_tokens, cfg.seq_len - cfg.edge_tokens)
    queries = QueryMoments(spec)
    wants_fisher = cfg.fisher_continuation > 0 and "fisher" in (cfg.key_scale, cfg.value_scale)
    fisher = FisherMoments(spec) if wants_fisher else None
    # One forward pass per sequence: what the PCA keeps (the last edge_tokens are skipped) and the Fisher's prefix
    # (its continuation runs on this pass's cache), so the tokens past both are never prefilled.
    prefix = cfg.seq_len - cfg.fisher_continuation
    run_len = max(keep.stop, prefix) if fisher is not None else keep.stop
    positions = torch.arange(run_len)
    gen = torch.Generator().manual_seed(0)
    phases = dict.fromkeys(("forward", "fisher", "covariance"), 0.0)
    fit_index = 0  # fit sequences seen (the Fisher takes every fisher_every-th)
    longest = max(len(s) for s in per_kind)
    order = [s[i] for i in range(longest) for s in per_kind if i < len(s)]  # interleave the domains
    for i, ids in enumerate(tqdm(order, desc="calibration: collect K/V", disable=not show_progress)):
        t = time.perf_counter()
        with queries.hooks(lm.model, keep):
            k, v, cache = prefill_kv(lm.model, ids[:run_len], kv_dtype(spec))  # [L, T, H, D] in the KV dtype
        phases["forward"] += time.perf_counter() - t
        t = time.perf_counter()
        k_un = remove_rope(k, positions, spec.ropes)[:, keep]  # [L, T', H, D] float32
        xk = k_un.permute(1, 0, 2, 3).reshape(k_un.shape[1], -1)  # [T', F]
        xv = v[:, keep].float().permute(1, 0, 2, 3).reshape(k_un.shape[1], -1)  # [T', F]
        if i % cfg.holdout_every == cfg.holdout_every - 1:
            held["k"].append(xk)
            held["v"].append(xv)
        else:
            acc["k"].update(xk)
            acc["v"].update(xv)
        phases["covariance"] += time.perf_counter() - t
        if i % cfg.holdout_every == cfg.holdout_every - 1:
            continue
        if fisher is not None and fit_index % cfg.fisher_every == 0:  # fit sequences, like the PCA
            t = time.perf_counter()
            fisher.update_from_cache(lm.model, cache, ids, prefix, keep_from=cfg.edge_tokens, generator=gen)
            phases["fisher"] += time.perf_counter() - t
        fit_index += 1
    return Collected(acc, held, queries, names, time.perf_counter() - t0, fisher, phases)


def write_artifacts(
    lm: LoadedModel,
    cfg: CalibrationConfig,
    col: Collected,
    out_dir: Path,
    show_progress: bool = True,
    *,
    pca_cache: dict | None = None,
) -> list[Path]:
    """Fit the PCA and the DP of ``col`` with ``cfg``'s settings; one artifact per ratio in ``out_dir``.

    ``pca_cache`` (a dict kept by the caller) reuses PCA fits across calls that share a stream's scale.
    """
    spec, acc, held, names = lm.spec, col.acc, col.held, col.names
    fits = {}
    scales = stream_scales(lm, cfg, col)
    block = spec.head_dim if cfg.normalize_heads else 1
    seconds = {"collect": col.seconds, **col.phases, "pca": 0.0, "group_errors": 0.0}
    for s in tqdm(("k", "v"), desc="calibration: PCA + group errors", disable=not show_progress):
        t = time.perf_counter()
        key = (s, cfg.key_scale if s == "k" else cfg.value_scale, block)
        cache = {} if pca_cache is None else pca_cache
        if key not in cache:
            cache[key] = acc[s].fit(block, scales[s])
        seconds["pca"] += time.perf_counter() - t
        t = time.perf_counter()
        fits[s] = _fit_stream(cache[key], torch.cat(held[s]), cfg.basis_bf16)
        seconds["group_errors"] += time.perf_counter() - t
    paths = []
    for ratio in tqdm(cfg.ratios, desc="calibration: DP bit allocation", disable=not show_progress):
        info = {
            "corpus": {
                "source": " + ".join(f"{SOURCES[d]} ({d})" for d in cfg.domains),
                "documents": names,
                "split": "calibration",
                "disjoint_from": "evaluation split (crc32(name) % 4 == 0)",
                "evaluation_only_domains": dict(EVAL_ONLY_KINDS),
            },
            "tokens_fit": acc["k"].num_tokens,
            "tokens_heldout": int(sum(x.shape[0] for x in held["k"])),
            "seq_len": cfg.seq_len,
            "normalize_heads": cfg.normalize_heads,
            "joint_budget": cfg.joint_budget,
            "key_scale": cfg.key_scale,
            "value_scale": cfg.value_scale,
            "basis_bf16": cfg.basis_bf16,
            "fisher_continuation": cfg.fisher_continuation,
            "fisher_every": cfg.fisher_every,
            "edge_tokens_skipped": cfg.edge_tokens,
        }
        t = time.perf_counter()
        keys, values = allocate(fits, ratio, cfg.joint_budget)
        info["seconds"] = {k: round(v, 1) for k, v in {**seconds, "dp": time.perf_counter() - t}.items()}
        art = CalibrationArtifact(spec=spec, keys=keys, values=values, target_ratio=float(ratio), info=info)
        paths.append(art.save(out_dir / artifact_name(spec.name, ratio, spec.tp_rank, spec.tp_size)))
    return paths


def artifact_name(model_name: str, ratio: float, tp_rank: int = 0, tp_size: int = 1) -> str:
    """File name of the artifact of ``model_name`` at ``ratio``, e.g. ``smollm2-135m-instruct.r16.kvtc.safetensors``;
    under tensor parallelism one per rank: ``smollm2-135m-instruct.r16.tp2-rank1.kvtc.safetensors``."""
    return f"{model_name}.r{ratio:g}{tp_suffix(tp_size, tp_rank)}{ARTIFACT_SUFFIX}"
