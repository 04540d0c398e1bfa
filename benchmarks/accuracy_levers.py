"""Accuracy-lever ablation: one calibration pass, several fits (issue 13).

Collects K/V and queries once, then writes one artifact folder per variant under ``--out``:
``rms`` (per-layer-head RMS scale, the old default), ``query`` (key metric from the model's
queries), ``wo`` (value metric from W_o), ``query_wo`` (both), ``query_bf16`` (basis in bfloat16),
and lever 3: ``query_fisherv`` (values whitened by their diagonal Fisher), ``fisher`` (both streams),
``fisher_joint`` (both, one K+V bit budget).
Evaluate each folder with ``python -m kvtc_sglang.eval --artifacts OUT/VARIANT ...``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from kvtc_sglang.calibration.fit import CalibrationConfig, collect, write_artifacts
from kvtc_sglang.calibration.model import COMPUTE_DTYPES, DEFAULT_COMPUTE, DEFAULT_MODEL, MODELS, load_model

_SEP = {"joint_budget": False}  # K and V each get half the bits (the default before lever 3)
VARIANTS = {
    "rms": {"key_scale": "rms", "value_scale": "rms", **_SEP},
    "query": {"key_scale": "query", "value_scale": "rms", **_SEP},
    "wo": {"key_scale": "rms", "value_scale": "wo", **_SEP},
    "query_wo": {"key_scale": "query", "value_scale": "wo", **_SEP},
    "query_bf16": {"key_scale": "query", "value_scale": "rms", "basis_bf16": True, **_SEP},
    # lever 3: the diagonal Fisher (KL sensitivity) of the cached features, calibration/fisher.py
    "query_fisherv": {"key_scale": "query", "value_scale": "fisher", **_SEP},
    "fisher": {"key_scale": "fisher", "value_scale": "fisher", **_SEP},
    "fisher_joint": {"key_scale": "fisher", "value_scale": "fisher", "joint_budget": True},  # the default
    "fisher_joint_bf16": {"key_scale": "fisher", "value_scale": "fisher", "joint_budget": True, "basis_bf16": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=30_000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--ratios", type=float, nargs="+", default=[16.0, 20.0])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("out/levers"))
    p.add_argument("--domains", nargs="+", default=list(CalibrationConfig.domains),
                   help="calibration text kinds (lever 4): prose, code, c")
    p.add_argument("--compute-dtype", choices=sorted(COMPUTE_DTYPES), default=DEFAULT_COMPUTE,
                   help="model arithmetic (the KV cache is bfloat16 either way)")
    args = p.parse_args()
    lm = load_model(args.model, compute_dtype=COMPUTE_DTYPES[args.compute_dtype])
    base = CalibrationConfig(tokens=args.tokens, seq_len=args.seq_len, ratios=tuple(args.ratios),
                             domains=tuple(args.domains))
    if not any("fisher" in (VARIANTS[n].get("key_scale"), VARIANTS[n].get("value_scale")) for n in args.variants):
        base = replace(base, key_scale="rms", value_scale="rms", fisher_continuation=0)  # skip the Fisher pass
    col = collect(lm, base)
    print(f"collect: {col.seconds:.1f} s, {col.acc['k'].num_tokens} fit tokens")
    cache: dict = {}
    for name in args.variants:
        t0 = time.perf_counter()
        paths = write_artifacts(lm, replace(base, **VARIANTS[name]), col, args.out / name, False, pca_cache=cache)
        print(f"{name}: {time.perf_counter() - t0:.1f} s -> {[str(x) for x in paths]}")


if __name__ == "__main__":
    main()
