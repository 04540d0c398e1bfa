"""CLI: ``python -m kvtc_sglang.eval`` -- the evaluation report of KVTC and baselines on held-out text."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..calibration.fit import artifact_name
from ..calibration.model import COMPUTE_DTYPES, DEFAULT_COMPUTE, DEFAULT_MODEL, MODELS, load_model
from ..codec import KVTCCodec, load_artifact
from ..codec.backend import TORCH_DOT_PRECISIONS
from ..codec.tp import LAYOUTS, rank_spec
from .harness import EvalConfig, evaluate
from .methods import (
    Method,
    deflate_method,
    fp8_method,
    kivi_method,
    kvtc_method,
    pca_truncation_method,
    tp_kvtc_method,
)


def build_methods(
    codecs: dict[float, KVTCCodec],
    no_sink_ratio: float,
    trunc_ratios: list[float],
    kvtc_only: bool = False,
    split_kv: bool = False,
) -> dict:
    methods: dict[str, tuple[Method, bool]] = {}
    for ratio, codec in sorted(codecs.items()):
        methods[f"kvtc r{ratio:g}"] = (kvtc_method(codec), True)
        if split_kv:
            methods[f"kvtc r{ratio:g}, keys only (V exact)"] = (kvtc_method(codec, keep="v"), True)
            methods[f"kvtc r{ratio:g}, values only (K exact)"] = (kvtc_method(codec, keep="k"), True)
    if kvtc_only:
        return methods
    if no_sink_ratio in codecs:
        methods[f"kvtc r{no_sink_ratio:g}, no sink exemption"] = (kvtc_method(codecs[no_sink_ratio]), False)
    methods["deflate only (lossless)"] = (deflate_method(), True)
    methods["fp8 e4m3"] = (fp8_method, True)
    methods["kivi 4-bit"] = (kivi_method(4), True)
    methods["kivi 2-bit"] = (kivi_method(2), True)
    for ratio in trunc_ratios:
        if ratio in codecs:
            methods[f"pca truncation r{ratio:g}"] = (pca_truncation_method(codecs[ratio], ratio), True)
    return methods


def domain_table(results: dict[str, dict]) -> str:
    """Mean KL / top-1 / perplexity change of every method on every evaluation domain."""
    kinds = list(next(iter(results.values()))["domains"])
    head = "| method | " + " | ".join(f"{k}: KL / top-1 / ppl" for k in kinds) + " |"
    rows = [head, "|---|" + "---|" * len(kinds)]
    for name, r in results.items():
        cells = [
            f"{d['mean_kl']:.4f} / {100 * d['top1_agreement']:.1f}% / {d['perplexity_change_pct']:+.2f}%"
            for d in (r["domains"][k] for k in kinds)
        ]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def markdown_table(results: dict[str, dict]) -> str:
    rows = [
        "| method | ratio before DEFLATE | ratio after DEFLATE | top-1 agreement | mean KL | perplexity change | "
        "K rel. err mean / max layer | V rel. err mean / max layer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        after = f"{r['ratio_after_entropy']:.1f}x" if r["ratio_after_entropy"] else "n/a"
        k, v = r["k_rel_err_per_layer"], r["v_rel_err_per_layer"]
        rows.append(
            f"| {name} | {r['ratio_before_entropy']:.1f}x | {after} | {100 * r['top1_agreement']:.1f}% | "
            f"{r['mean_kl']:.4f} | {r['perplexity_change_pct']:+.2f}% | {sum(k) / len(k):.3f} / {max(k):.3f} | "
            f"{sum(v) / len(v):.3f} / {max(v):.3f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m kvtc_sglang.eval", description=__doc__)
    p.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL, help="model to evaluate")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"), help="folder of calibration artifacts")
    p.add_argument("--ratios", type=float, nargs="+", default=[4, 8, 16, 20, 32, 64])
    p.add_argument("--segments", type=int, default=3, help="held-out segments per domain")
    p.add_argument("--kinds", nargs="+", default=["prose", "code", "perl"], help="evaluation domains")
    p.add_argument("--split", choices=["evaluation", "calibration"], default="evaluation")
    p.add_argument("--skip-segments", type=int, default=0, help="segments per domain to skip (calibration split)")
    p.add_argument("--split-kv", action="store_true", help="also K-only and V-only compression (error split)")
    p.add_argument("--kvtc-only", action="store_true", help="skip the baselines (faster ablations)")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--continuation", type=int, default=256)
    p.add_argument("--tp-sizes", type=int, nargs="+", default=[],
                   help="also KVTC with each size's per-rank artifacts (python -m kvtc_sglang.calibration --tp-sizes)")
    p.add_argument("--tp-layout", choices=LAYOUTS, default="cpu", help="the layout they were calibrated for")
    p.add_argument("--dot-precisions", nargs="+", choices=TORCH_DOT_PRECISIONS, default=["ieee"],
                   help="the codec's projection precisions (torch backend): the first for every row, each other "
                        "as extra KVTC rows (bf16: what the CPU server uses)")
    p.add_argument("--json", type=Path, default=None, help="write the full report (per-layer errors) here")
    p.add_argument("--compute-dtype", choices=sorted(COMPUTE_DTYPES), default=DEFAULT_COMPUTE,
                   help="model arithmetic (the KV cache is bfloat16 either way)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    lm = load_model(args.model, compute_dtype=COMPUTE_DTYPES[args.compute_dtype])
    codecs = {}
    for ratio in args.ratios:
        path = args.artifacts / artifact_name(lm.spec.name, ratio)
        codecs[float(ratio)] = KVTCCodec(load_artifact(path, expect=lm.spec), dot_precision=args.dot_precisions[0])
    cfg = EvalConfig(
        context=args.context,
        continuation=args.continuation,
        segments_per_kind=args.segments,
        kinds=tuple(args.kinds),
        split=args.split,
        skip_segments=args.skip_segments,
    )
    no_sink = 16.0 if 16.0 in codecs else min(codecs)
    methods = build_methods(
        codecs, no_sink, [r for r in (4.0, 8.0, 16.0, 20.0) if r in codecs], args.kvtc_only, args.split_kv
    )
    for precision in args.dot_precisions[1:]:
        for ratio, codec in codecs.items():
            other = KVTCCodec(codec.artifact, dot_precision=precision)
            methods[f"kvtc r{ratio:g}, {precision} projections"] = (kvtc_method(other), True)
    for tp in args.tp_sizes:
        for ratio in args.ratios:
            ranks = [rank_spec(lm.spec, tp, r, args.tp_layout) for r in range(tp)]
            per_rank = [KVTCCodec(load_artifact(args.artifacts / artifact_name(lm.spec.name, ratio, s.tp_rank, tp),
                                                expect=s)) for s in ranks]
            methods[f"kvtc r{ratio:g}, tp {tp} (per-rank PCA)"] = (tp_kvtc_method(per_rank), True)
    with torch.inference_mode():
        results = evaluate(lm, cfg, methods)
    print(
        f"\nKVTC evaluation: {lm.spec.name}, {args.segments} held-out segments each of {', '.join(cfg.kinds)}, context "
        f"{cfg.context}, sinks {cfg.sinks} and window {cfg.window} uncompressed, {cfg.continuation} "
        f"teacher-forced tokens each; {time.perf_counter() - t0:.0f} s\n"
    )
    print(markdown_table(results))
    print()
    print(domain_table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": vars(cfg), "results": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
