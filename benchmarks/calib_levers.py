"""Calibration-cost levers: one pass of the model, several calibrations' statistics, one artifact folder each.

The pass reads ``--tokens`` of calibration text once (the sequences, order and held-out choice of
``python -m kvtc_sglang.calibration --tokens N``) and keeps, besides the full statistics, snapshots after
the first ``--snapshots`` sequences: the first 16 sequences are exactly what ``--tokens 30000`` reads and the
first 26 what ``--tokens 50000`` reads. Every fit sequence also gets several Fisher estimates from the same
prefill: ``c128`` (the default: 128 sampled continuation tokens, seed 0), ``c128s1`` (seed 1: the run-to-run
noise of the Fisher's sampling), ``c64`` (64 tokens), and ``c128half`` / ``c128quarter`` (the ``c128``
estimate of every 2nd / 4th fit sequence only). Variants are ``t<thousand tokens>_<fisher>``, e.g.
``t50_c128half``; each is fitted like the library does and written to ``OUT/VARIANT``. Evaluate with
``python benchmarks/eval_levers.py --levers OUT --variants ...``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from kvtc_sglang.calibration.corpus import token_sequences
from kvtc_sglang.calibration.fisher import FisherMoments, sequence_scores
from kvtc_sglang.calibration.fit import CalibrationConfig, Collected, write_artifacts
from kvtc_sglang.calibration.metric import QueryMoments
from kvtc_sglang.calibration.model import DEFAULT_MODEL, MODELS, kv_dtype, load_model, prefill_kv
from kvtc_sglang.calibration.pca import CovarianceAccumulator
from kvtc_sglang.codec.rope import remove_rope

# name: (continuation tokens, sampling seed, use every n-th fit sequence)
FISHERS = {"c128": (128, 0, 1), "c128s1": (128, 1, 1), "c64": (64, 0, 1), "c128half": (128, 0, 2),
           "c128quarter": (128, 0, 4)}  # fmt: skip


def sequences(lm, cfg: CalibrationConfig) -> tuple[list[torch.Tensor], dict]:
    """The calibration's sequences in its order (domains interleaved) and the document names per domain."""
    per_kind, names = [], {}
    for kind in cfg.domains:
        s, n = token_sequences(lm.tokenizer, "calibration", kind, cfg.seq_len, cfg.tokens // len(cfg.domains))
        per_kind.append(s)
        names[kind] = n
    longest = max(len(s) for s in per_kind)
    return [s[i] for i in range(longest) for s in per_kind if i < len(s)], names


def collect_all(lm, cfg: CalibrationConfig, snapshots: list[int], fishers: list[str]) -> tuple[dict, dict]:
    """``({num_sequences: (Collected, {fisher: FisherMoments})}, seconds per phase)`` for every snapshot and the
    whole pass."""
    spec = lm.spec
    order, _ = sequences(lm, cfg)
    keep = slice(cfg.edge_tokens, cfg.seq_len - cfg.edge_tokens)
    run_len = max(keep.stop, *(cfg.seq_len - FISHERS[f][0] for f in fishers))
    positions = torch.arange(run_len)
    acc = {s: CovarianceAccumulator(spec.num_features) for s in ("k", "v")}
    held: dict[str, list[torch.Tensor]] = {"k": [], "v": []}
    queries = QueryMoments(spec)
    fm = {f: FisherMoments(spec) for f in fishers}
    gens = {(c, seed): torch.Generator().manual_seed(seed) for c, seed, _ in (FISHERS[f] for f in fishers)}
    secs = {"forward": 0.0, "covariance": 0.0, **{f"fisher {c}": 0.0 for c, _ in gens}}
    out, fit_index = {}, 0
    for i, ids in enumerate(tqdm(order, desc="levers: collect")):
        t = time.perf_counter()
        with queries.hooks(lm.model, keep):
            k, v, cache = prefill_kv(lm.model, ids[:run_len], kv_dtype(spec))
        secs["forward"] += time.perf_counter() - t
        t = time.perf_counter()
        k_un = remove_rope(k, positions, spec.ropes)[:, keep]
        xk = k_un.permute(1, 0, 2, 3).reshape(k_un.shape[1], -1)
        xv = v[:, keep].float().permute(1, 0, 2, 3).reshape(k_un.shape[1], -1)
        is_held = i % cfg.holdout_every == cfg.holdout_every - 1
        if is_held:
            held["k"].append(xk)
            held["v"].append(xv)
        else:
            acc["k"].update(xk)
            acc["v"].update(xv)
        secs["covariance"] += time.perf_counter() - t
        if not is_held:
            scores = {}
            for (c, seed), gen in gens.items():  # each estimate once, shared by the subsets
                t = time.perf_counter()
                scores[(c, seed)] = sequence_scores(
                    lm.model, spec, cache, ids, cfg.seq_len - c, keep_from=cfg.edge_tokens, generator=gen
                )
                secs[f"fisher {c}"] += time.perf_counter() - t
            for f in fishers:
                c, seed, every = FISHERS[f]
                if fit_index % every == 0:
                    fm[f].add(*scores[(c, seed)])
            fit_index += 1
        if i + 1 in snapshots or i + 1 == len(order):
            col = Collected(copy.deepcopy(acc), {s: list(x) for s, x in held.items()}, copy.deepcopy(queries), {}, 0.0)
            out[i + 1] = (col, copy.deepcopy(fm))
    for c, _ in gens:
        secs[f"fisher {c}"] /= sum(1 for cc, _ in gens if cc == c)  # per estimate
    return out, secs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL)
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--snapshots", type=int, nargs="*", default=[16, 26], help="sequence counts to fit as well")
    p.add_argument("--fishers", nargs="+", choices=sorted(FISHERS), default=list(FISHERS))
    p.add_argument("--variants", nargs="+", required=True, help="t<k tokens>_<fisher>, e.g. t100_c128 t50_c128half")
    p.add_argument("--ratios", type=float, nargs="+", default=[16.0, 20.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("out/calib_levers"))
    p.add_argument("--reuse", action="store_true", help="fit from OUT/stats.pt of an earlier pass")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, compute_dtype=torch.float32)
    base = CalibrationConfig(tokens=args.tokens, ratios=tuple(args.ratios))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.reuse:
        cols = torch.load(args.out / "stats.pt", weights_only=False)
    else:
        t0 = time.perf_counter()
        cols, secs = collect_all(lm, base, args.snapshots, args.fishers)
        secs["collect"] = time.perf_counter() - t0
        print("collect:", json.dumps({k: round(v, 1) for k, v in secs.items()}), flush=True)
        (args.out / "collect_seconds.json").write_text(json.dumps(secs, indent=1))
        torch.save(cols, args.out / "stats.pt")
    full = max(cols)
    for var in args.variants:
        thousands, fisher = var.removeprefix("t").split("_")
        tokens = int(thousands) * 1000
        cfg = replace(base, tokens=tokens, fisher_continuation=FISHERS[fisher][0])
        num_seq = len(sequences(lm, cfg)[0])
        if num_seq not in cols:
            raise ValueError(f"{var}: {tokens} tokens are {num_seq} sequences; snapshots {sorted(cols)}")
        if num_seq == full and tokens != args.tokens:
            raise ValueError(f"{var}: {tokens} tokens read as many sequences as --tokens {args.tokens}")
        c, fm = cols[num_seq]
        col = Collected(c.acc, c.held, c.queries, sequences(lm, cfg)[1], 0.0, fm[fisher])
        t = time.perf_counter()
        paths = write_artifacts(lm, cfg, col, args.out / var, False)
        info = {"fit_seconds": round(time.perf_counter() - t, 1), "sequences": num_seq}
        (args.out / var / "info.json").write_text(json.dumps(info))
        print(f"{var}: {info} -> {[str(x) for x in paths]}", flush=True)


if __name__ == "__main__":
    main()
