"""Accuracy-lever ablation: one calibration pass, several fits (issue 13).

Collects K/V and queries once, then writes one artifact folder per variant under ``--out``:
``rms`` (per-layer-head RMS scale, the old default), ``query`` (key metric from the model's
queries), ``wo`` (value metric from W_o), ``query_wo`` (both), ``query_bf16`` (basis in bfloat16).
Evaluate each folder with ``python -m kvtc_sglang.eval --artifacts OUT/VARIANT ...``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from kvtc_sglang.calibration.fit import CalibrationConfig, collect, write_artifacts
from kvtc_sglang.calibration.model import DEFAULT_MODEL, MODELS, load_model

VARIANTS = {
    "rms": {"key_scale": "rms", "value_scale": "rms"},
    "query": {"key_scale": "query", "value_scale": "rms"},
    "wo": {"key_scale": "rms", "value_scale": "wo"},
    "query_wo": {"key_scale": "query", "value_scale": "wo"},
    "query_bf16": {"key_scale": "query", "value_scale": "rms", "basis_bf16": True},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=30_000)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--ratios", type=float, nargs="+", default=[16.0, 20.0])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    p.add_argument("--out", type=Path, default=Path("out/levers"))
    args = p.parse_args()
    lm = load_model(args.model)
    base = CalibrationConfig(tokens=args.tokens, seq_len=args.seq_len, ratios=tuple(args.ratios))
    col = collect(lm, base)
    print(f"collect: {col.seconds:.1f} s, {col.acc['k'].num_tokens} fit tokens")
    cache: dict = {}
    for name in args.variants:
        t0 = time.perf_counter()
        paths = write_artifacts(lm, replace(base, **VARIANTS[name]), col, args.out / name, False, pca_cache=cache)
        print(f"{name}: {time.perf_counter() - t0:.1f} s -> {[str(x) for x in paths]}")


if __name__ == "__main__":
    main()
