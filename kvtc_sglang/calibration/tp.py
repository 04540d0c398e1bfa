"""Per-rank calibration for tensor parallelism: one artifact per rank, each a PCA over that rank's own heads.

Rank ``r``'s features are a subset of the whole model's (its KV heads, :mod:`kvtc_sglang.codec.tp`), plus
all-zero features for the zero heads SGLang's CPU engine pads in. Every statistic the fit needs (the
covariance's sums, the held-out K/V, the Fisher's squared scores, the query moments) restricts exactly to a
subset of features, so one pass of the model (:func:`.fit.collect`) serves tp 1 and every rank of every
``tp_size``: :func:`restrict` takes a rank's share of it, and :func:`.fit.write_artifacts` fits that.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..codec.spec import ModelSpec
from ..codec.tp import feature_index, rank_spec, split_heads, take_features
from .fisher import FisherMoments
from .fit import CalibrationConfig, Collected, write_artifacts
from .metric import QueryMoments
from .model import LoadedModel


def restrict(col: Collected, spec: ModelSpec, rank: ModelSpec) -> Collected:
    """Rank ``rank``'s share of ``col`` (collected with the whole model's ``spec``)."""
    index = feature_index(spec, rank.tp_heads)  # [F_r]
    acc = {s: a.take(index) for s, a in col.acc.items()}
    held = {s: [take_features(x, index) for x in xs] for s, xs in col.held.items()}  # [T', F_r] each
    queries = QueryMoments(rank)
    queries.sum = split_heads(col.queries.sum, rank.tp_heads, dim=1)  # [L, H, D, D] -> [L, H_r, D, D]
    queries.count = col.queries.count
    fisher = None
    if col.fisher is not None:
        fisher = FisherMoments(rank)
        fisher.sum = {s: take_features(x, index) for s, x in col.fisher.sum.items()}  # [F_r]
        fisher.count = col.fisher.count
    return replace(col, acc=acc, held=held, queries=queries, fisher=fisher)


def write_rank_artifacts(lm: LoadedModel, cfg: CalibrationConfig, col: Collected, out_dir: Path, *, tp_size: int,
                         layout: str = "cpu", show_progress: bool = True) -> list[Path]:
    """One artifact per rank and ratio for ``--tp tp_size``, ranks in order (``layout``: see
    :func:`~kvtc_sglang.codec.tp.rank_kv_heads`)."""
    if tp_size < 2:
        raise ValueError(f"tp_size must be >= 2 for per-rank artifacts, got {tp_size}")
    if cfg.value_scale == "wo":
        raise ValueError("value_scale 'wo' reads the model's W_o per head; per-rank calibration takes 'fisher' "
                         "or 'rms'")
    paths = []
    for r in range(tp_size):
        spec_r = rank_spec(lm.spec, tp_size, r, layout)
        col_r = restrict(col, lm.spec, spec_r)
        paths += write_artifacts(replace(lm, spec=spec_r), cfg, col_r, out_dir, show_progress)
    return paths
