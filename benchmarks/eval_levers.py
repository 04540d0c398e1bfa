"""Evaluate several calibration variants side by side (shared prefill and reference per segment).

``python benchmarks/eval_levers.py --levers out/levers --variants rms query --ratios 16 20``
reads ``out/levers/VARIANT/<model>.r<ratio>.kvtc.safetensors`` (written by accuracy_levers.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvtc_sglang.calibration.fit import artifact_name
from kvtc_sglang.calibration.model import COMPUTE_DTYPES, DEFAULT_COMPUTE, DEFAULT_MODEL, MODELS, load_model
from kvtc_sglang.codec import KVTCCodec, load_artifact
from kvtc_sglang.eval.__main__ import domain_table, markdown_table
from kvtc_sglang.eval.harness import EvalConfig, evaluate
from kvtc_sglang.eval.methods import kvtc_method


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL)
    p.add_argument("--levers", type=Path, default=Path("out/levers"))
    p.add_argument("--variants", nargs="+", required=True)
    p.add_argument("--ratios", type=float, nargs="+", default=[16.0, 20.0])
    p.add_argument("--segments", type=int, default=1, help="segments per domain")
    p.add_argument("--kinds", nargs="+", default=["prose", "code", "perl"])
    p.add_argument("--split", choices=["evaluation", "calibration"], default="evaluation")
    p.add_argument("--skip-segments", type=int, default=0)
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--split-kv", nargs="*", default=[], help="variants to also run K-only / V-only")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--compute-dtype", choices=sorted(COMPUTE_DTYPES), default=DEFAULT_COMPUTE,
                   help="model arithmetic (the KV cache is bfloat16 either way)")
    args = p.parse_args()
    t0 = time.perf_counter()
    lm = load_model(args.model, compute_dtype=COMPUTE_DTYPES[args.compute_dtype])
    methods = {}
    for var in args.variants:
        for ratio in args.ratios:
            art = load_artifact(args.levers / var / artifact_name(lm.spec.name, ratio), expect=lm.spec)
            codec = KVTCCodec(art)
            methods[f"{var} r{ratio:g}"] = (kvtc_method(codec), True)
            if var in args.split_kv:
                methods[f"{var} r{ratio:g}, keys only"] = (kvtc_method(codec, keep="v"), True)
                methods[f"{var} r{ratio:g}, values only"] = (kvtc_method(codec, keep="k"), True)
    cfg = EvalConfig(
        continuation=args.continuation,
        segments_per_kind=args.segments,
        kinds=tuple(args.kinds),
        split=args.split,
        skip_segments=args.skip_segments,
    )
    with torch.inference_mode():
        results = evaluate(lm, cfg, methods)
    print(
        f"\n{lm.spec.name}, {args.split} split, {args.segments} segment(s) per domain; "
        f"{time.perf_counter() - t0:.0f} s\n"
    )
    print(markdown_table(results))
    print()
    print(domain_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": vars(cfg), "results": results}, indent=1))


if __name__ == "__main__":
    main()
