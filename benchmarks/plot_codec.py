"""Plots of the codec: where the bits go (per-component variance and allocated bits), and ratio/accuracy
curves from an evaluation report.

    python benchmarks/plot_codec.py --artifact artifacts/smollm2-135m-instruct.r16.kvtc.safetensors \
        --eval out/eval.json --out out

``out/eval.json`` is written by ``python -m kvtc_sglang.eval --json``. Before/after curves of calibration
variants (issue 13) from ``benchmarks/eval_levers.py --json``:

    python benchmarks/plot_codec.py --levers-json out/eval_before_after.json --out out
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kvtc_sglang.codec import KIND_BITS, load_artifact  # noqa: E402


def bit_allocation(artifact_path: Path, out: Path) -> Path:
    art = load_artifact(artifact_path)
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for ax, (name, stream) in zip(axes, (("keys (RoPE removed)", art.keys), ("values", art.values)), strict=True):
        var = stream.variance.float()
        ax.semilogy(range(1, var.numel() + 1), var.clamp_min(1e-12).numpy(), color="tab:blue", lw=1)
        ax.set_ylabel("component variance", color="tab:blue")
        bits = []
        for g in stream.allocation.groups:
            bits += [KIND_BITS[g.kind]] * g.size
        bits += [0] * (var.numel() - len(bits))
        twin = ax.twinx()
        twin.step(range(1, len(bits) + 1), bits, where="post", color="tab:red", lw=1.2)
        twin.set_ylabel("bits per coefficient", color="tab:red")
        twin.set_ylim(-0.3, 9)
        ax.set_xscale("log")
        ax.set_title(f"{name}: {stream.allocation.bits_per_token} bits/token, rank {stream.allocation.rank}")
    axes[1].set_xlabel("principal component (all layers and heads, log scale)")
    fig.suptitle(f"{art.spec.name}, target {art.target_ratio:g}x: variance and bit allocation")
    fig.tight_layout()
    path = out / f"bit_allocation_r{art.target_ratio:g}.png"
    fig.savefig(path, dpi=110)
    return path


def curves(eval_json: Path, out: Path) -> Path:
    results = json.loads(eval_json.read_text())["results"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    metrics = (("top1_agreement", "top-1 agreement", 100.0), ("mean_kl", "mean KL (nats)", 1.0),
               ("perplexity_change_pct", "perplexity change (%)", 1.0))
    kvtc = sorted(((r["ratio_after_entropy"], r) for n, r in results.items() if re.fullmatch(r"kvtc r[\d.]+", n)),
                  key=lambda x: x[0])
    for ax, (key, label, scale) in zip(axes, metrics, strict=True):
        ax.plot([x for x, _ in kvtc], [r[key] * scale for _, r in kvtc], "o-", label="KVTC")
        for name, r in results.items():
            if name.startswith("kvtc r") and "no sink" not in name:
                continue
            ratio = r["ratio_after_entropy"] or r["ratio_before_entropy"]
            ax.plot([ratio], [r[key] * scale], "s", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio (x)")
        ax.set_title(label)
        if key == "mean_kl":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "ratio_accuracy.png"
    fig.savefig(path, dpi=110)
    return path


_LABELS = {"rms": "RMS scales, K/V 50/50 (before issue 13)", "query": "lever 1: key metric from queries",
           "fisher_joint": "lever 3: Fisher scales, joint K+V budget (default)"}


def lever_curves(levers_json: Path, out: Path) -> Path:
    """KL, top-1 and perplexity change against the ratio after DEFLATE, one line per calibration variant."""
    results = json.loads(levers_json.read_text())["results"]
    lines: dict[str, list] = {}
    for name, r in results.items():
        m = re.fullmatch(r"(\S+) r([\d.]+)", name)  # "VARIANT rRATIO"; split-K/V rows have a suffix
        if m:
            lines.setdefault(m.group(1), []).append((r["ratio_after_entropy"], r))
    if not lines:
        raise ValueError(f"{levers_json}: no 'VARIANT rRATIO' results (write it with benchmarks/eval_levers.py)")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    metrics = (("mean_kl", "mean KL (nats)", 1.0), ("top1_agreement", "top-1 agreement (%)", 100.0),
               ("perplexity_change_pct", "perplexity change (%)", 1.0))
    for ax, (key, label, scale) in zip(axes, metrics, strict=True):
        for var, pts in lines.items():
            pts.sort(key=lambda x: x[0])
            ax.plot([x for x, _ in pts], [r[key] * scale for _, r in pts], "o-", label=_LABELS.get(var, var))
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio after DEFLATE (x)")
        ax.set_title(label)
        if key == "mean_kl":
            ax.set_yscale("log")
            ax.axhline(0.01, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path = out / "ratio_accuracy_levers.png"
    fig.savefig(path, dpi=110)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=None)
    ap.add_argument("--eval", type=Path, default=None)
    ap.add_argument("--levers-json", type=Path, default=None, help="eval_levers.py --json output")
    ap.add_argument("--out", type=Path, default=Path("out"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.artifact:
        print(bit_allocation(args.artifact, args.out))
    if args.eval:
        print(curves(args.eval, args.out))
    if args.levers_json:
        print(lever_curves(args.levers_json, args.out))


if __name__ == "__main__":
    main()
