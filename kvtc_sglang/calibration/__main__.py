"""CLI: ``python -m kvtc_sglang.calibration --ratios 8 16 20 32 64 --out artifacts``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..codec.artifact import load_artifact
from ..codec.spec import ModelSpec
from ..codec.tp import LAYOUTS, rank_spec
from .fit import KEY_SCALES, VALUE_SCALES, CalibrationConfig, collect, write_artifacts
from .model import COMPUTE_DTYPES, DEFAULT_COMPUTE, DEFAULT_MODEL, MODELS, load_model
from .tp import write_rank_artifacts


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(prog="python -m kvtc_sglang.calibration", description=__doc__)
    p.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL, help="model to calibrate")
    p.add_argument("--tokens", type=int, default=100_000, help="calibration tokens (equal shares of --domains)")
    p.add_argument("--domains", nargs="+", default=list(CalibrationConfig.domains),
                   help="calibration text kinds: prose, code, c (C headers); perl is evaluation-only")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--ratios", type=float, nargs="+", default=[16.0], help="target compression ratios")
    p.add_argument("--out", type=Path, default=Path("artifacts"), help="output folder")
    p.add_argument("--key-scale", choices=KEY_SCALES, default=CalibrationConfig.key_scale, help="key metric")
    p.add_argument("--value-scale", choices=VALUE_SCALES, default=CalibrationConfig.value_scale, help="value metric")
    p.add_argument("--basis-bf16", action="store_true", help="round the basis to bfloat16")
    p.add_argument("--joint-budget", action=argparse.BooleanOptionalAction, default=CalibrationConfig.joint_budget,
                   help="one bit budget shared by K and V")
    p.add_argument("--fisher-continuation", type=int, default=CalibrationConfig.fisher_continuation,
                   help="sampled tokens per sequence for the Fisher (KL-sensitivity) scales; needed by 'fisher'")
    p.add_argument("--fisher-every", type=int, default=CalibrationConfig.fisher_every,
                   help="the Fisher's backward pass on every n-th fit sequence only (1: all)")
    p.add_argument("--tp-sizes", type=int, nargs="+", default=[1],
                   help="tensor parallelism: for each size N > 1, one artifact per rank (its own heads' PCA); "
                        "1: the whole model's; several sizes share one pass of the model")
    p.add_argument("--tp-layout", choices=LAYOUTS, default="cpu",
                   help="how SGLang splits the KV heads: 'cpu' pads zero heads (the CPU engine), 'gpu' replicates")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--compute-dtype", choices=sorted(COMPUTE_DTYPES), default=DEFAULT_COMPUTE,
                   help="model arithmetic (the KV cache is bfloat16 either way)")
    args = p.parse_args(argv)
    if min(args.tp_sizes) < 1 or len(set(args.tp_sizes)) != len(args.tp_sizes):
        p.error(f"--tp-sizes must be distinct and >= 1, got {args.tp_sizes}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = CalibrationConfig(
        tokens=args.tokens,
        seq_len=args.seq_len,
        ratios=tuple(args.ratios),
        key_scale=args.key_scale,
        value_scale=args.value_scale,
        basis_bf16=args.basis_bf16,
        joint_budget=args.joint_budget,
        fisher_continuation=args.fisher_continuation,
        fisher_every=args.fisher_every,
        domains=tuple(args.domains),
    )
    t0 = time.perf_counter()
    lm = load_model(args.model, compute_dtype=COMPUTE_DTYPES[args.compute_dtype])
    col = collect(lm, cfg)
    paths: list[Path] = []
    specs: list[ModelSpec] = []
    for tp in args.tp_sizes:
        if tp == 1:
            paths += write_artifacts(lm, cfg, col, args.out)
            specs += [lm.spec] * len(cfg.ratios)
        else:
            paths += write_rank_artifacts(lm, cfg, col, args.out, tp_size=tp, layout=args.tp_layout)
            specs += [rank_spec(lm.spec, tp, r, args.tp_layout) for r in range(tp) for _ in cfg.ratios]
    wall = time.perf_counter() - t0
    for path, spec in zip(paths, specs, strict=True):
        art = load_artifact(path, expect=spec)
        print(
            f"{path}  ({path.stat().st_size / 2**20:.1f} MiB)  ratio {art.target_ratio:g}: "
            f"K {art.keys.allocation.summary()}; V {art.values.allocation.summary()}"
        )
    print(f"calibration wall time {wall:.1f} s (model load included), {cfg.tokens} tokens")
    return paths


if __name__ == "__main__":
    main()
