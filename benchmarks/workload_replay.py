"""Workload replays: vanilla SGLang ``RadixCache`` vs ``KVTCRadixCache`` at the same KV memory (CPU).

Seeded traces built from real held-out text (SmolLM2 tokenizer), replayed through SGLang 0.5.23's real
pool, allocator and radix caches by the scheduler-like driver (``kvtc_sglang.workloads.replay``). The K/V
written for a token at depth ``d`` is SmolLM2's real K/V of real text at position ``d``, so blob sizes are
real. Both backends get a pool of ``--pool-tokens`` slots; KVTC's compressed store borrows pages of it on
demand (at most ``--store-fraction``) and gives them back when a request needs them.

- ``agentic``: many multi-turn sessions, interleaved (the others' turns are each one's think time); every
  turn re-sends the whole history plus a user message, then the model's reply joins the history.
- ``shared_prompt``: a few long system prompts (one per "app"), many short user turns on random apps.
- ``code_edit``: source files re-sent after small edits (1-3 tokens changed, late in the file more often).

    python benchmarks/workload_replay.py [--full] [--pool-tokens 2048] [--plot out/workload_replay.png]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.calibration.corpus import token_sequences
from kvtc_sglang.calibration.model import load_default_model, prefill_kv
from kvtc_sglang.codec import KVTCCodec, load_artifact
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import BankKV, Driver, build_cache, build_pool

SIZES = {  # default (minutes on 2 CPU cores) and --full
    False: {"sessions": 24, "turns": 6, "apps": 8, "system": 768, "users": 96, "files": 8, "file": 896, "edits": 64},
    True: {"sessions": 64, "turns": 8, "apps": 16, "system": 1024, "users": 320, "files": 16, "file": 1536,
           "edits": 200},
}


def _segments(tok, kind: str, length: int, count: int) -> list[list[int]]:
    segs, _ = token_sequences(tok, "evaluation", kind, length, length * count)
    if len(segs) < count:
        raise RuntimeError(f"evaluation text has {len(segs)} {kind} segments of {length} tokens, need {count}")
    return [s.tolist() for s in segs[:count]]


def agentic(tok, rng: random.Random, n: dict) -> list[list[int]]:
    """User messages are prose, replies and tool outputs are code; each session starts with its own id."""
    need = n["sessions"] * n["turns"]
    users = _segments(tok, "prose", 96, min(need, 160))
    replies = _segments(tok, "code", 96, need)
    history = [[rng.randrange(1, 49152) for _ in range(8)] for _ in range(n["sessions"])]
    left = [n["turns"]] * n["sessions"]
    trace = []
    while any(left):
        s = rng.choice([i for i, t in enumerate(left) if t])
        user, reply = rng.choice(users)[: rng.randint(24, 96)], replies.pop()[: rng.randint(48, 96)]
        history[s] = history[s] + user + reply
        trace.append(list(history[s]))
        left[s] -= 1
    return trace


def shared_prompt(tok, rng: random.Random, n: dict) -> list[list[int]]:
    systems = _segments(tok, "code", n["system"], n["apps"])
    users = _segments(tok, "prose", 64, min(n["users"], 160))  # the held-out prose has ~250 such segments
    if n["users"] > len(users):  # --full: user turns repeat (other apps, other lengths)
        users = [rng.choice(users) for _ in range(n["users"])]
    return [systems[rng.randrange(n["apps"])] + u[: rng.randint(16, 64)] for u in users]


def code_edit(tok, rng: random.Random, n: dict) -> list[list[int]]:
    files = _segments(tok, "code", n["file"], n["files"])
    ask = _segments(tok, "prose", 32, 1)[0]
    trace = []
    for _ in range(n["edits"]):
        f = rng.randrange(len(files))
        body = list(files[f])
        for _ in range(rng.randint(1, 3)):
            pos = int(len(body) * (1 - rng.random() ** 2))  # late positions are edited more often
            body[min(pos, len(body) - 1)] = rng.randrange(1, 49152)
        files[f] = body
        trace.append(body + ask)
    return trace


def replay(trace: list[list[int]], cache, bank: BankKV) -> dict:
    drv = Driver(cache, bank)
    t0 = time.perf_counter()
    for tokens in trace:
        req = drv.start(tokens)
        if req is not None:
            drv.finish(req)
    check_invariants(cache)
    stats = getattr(cache, "stats", None)
    total = drv.hit_tokens + drv.computed_tokens
    return {
        "requests": len(trace),
        "requests_not_admitted": drv.failed,
        "input_tokens": total,
        "hit_tokens": drv.hit_tokens,
        "hit_rate": drv.hit_tokens / total if total else 0.0,
        "recomputed_tokens": drv.computed_tokens,
        "resident_prefix_tokens": cache.total_size() + (cache.compressed_size() if stats else 0),
        "device_tokens": cache.total_size(),
        "compressed_tokens": cache.compressed_size() if stats else 0,
        "ratio": stats.ratio if stats else 1.0,
        "compress_seconds": stats.compress_seconds if stats else 0.0,
        "restore_seconds": stats.restore_seconds if stats else 0.0,
        "restored_tokens": stats.restored_tokens if stats else 0,
        "dropped_tokens": stats.dropped_tokens if stats else 0,
        "compressions": stats.compressions if stats else 0,
        "reused_blobs": stats.reused_blobs if stats else 0,
        "encodes": stats.encodes if stats else 0,
        "seconds": time.perf_counter() - t0,
    }


@torch.inference_mode()
def prefill_ms_per_token(lm, ids: list[int]) -> float:
    x = torch.tensor(ids[:512])[None]
    lm.model(x)  # warm-up
    t0 = time.perf_counter()
    lm.model(x)
    return 1e3 * (time.perf_counter() - t0) / x.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, default=Path("artifacts/smollm2-135m-instruct.r16.kvtc.safetensors"))
    ap.add_argument("--pool-tokens", type=int, default=2048)
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--store-fraction", type=float, default=KVTCCacheConfig.store_fraction,
                    help="KVTC: most of the pool the compressed store may borrow")
    ap.add_argument("--full", action="store_true")
    ap.add_argument("--workloads", nargs="+", choices=("agentic", "shared_prompt", "code_edit"),
                    default=["agentic", "shared_prompt", "code_edit"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=Path("out/workload_replay.json"))
    ap.add_argument("--plot", type=Path, default=Path("out/workload_replay.png"))
    args = ap.parse_args()
    lm = load_default_model()
    codec = KVTCCodec(load_artifact(args.artifact, expect=lm.spec))
    n = SIZES[args.full]
    bank_len = 2048 if not args.full else 4096
    (bank_ids,), _ = token_sequences(lm.tokenizer, "evaluation", "prose", bank_len, bank_len)
    k, v, _ = prefill_kv(lm.model, bank_ids)
    bank = BankKV(k, v)
    ms_tok = prefill_ms_per_token(lm, bank_ids.tolist())
    rows = []
    makers = {"agentic": agentic, "shared_prompt": shared_prompt, "code_edit": code_edit}
    for name, make in ((w, makers[w]) for w in args.workloads):
        trace = [t[:bank_len] for t in make(lm.tokenizer, random.Random(args.seed), n)]
        for backend in ("radix", "kvtc"):
            _, allocator = build_pool(codec.spec, args.pool_tokens, args.page_size)
            cfg = KVTCCacheConfig(calibration=str(args.artifact), store_fraction=args.store_fraction, encode="inline")
            cache = build_cache(allocator, args.page_size, codec if backend == "kvtc" else None, cfg)
            r = replay(trace, cache, bank)
            r.update(workload=name, backend=backend, prefill_ms_per_token=ms_tok)
            rows.append(r)
            print(json.dumps({k: (round(x, 4) if isinstance(x, float) else x) for k, x in r.items()}), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))
    print(table(rows, args.pool_tokens, args.store_fraction))
    plot(rows, args.plot)


def table(rows: list[dict], pool: int, store_fraction: float) -> str:
    by = {(r["workload"], r["backend"]): r for r in rows}
    out = [f"pool: {pool} token slots for both backends; kvtc store: up to {store_fraction:g} of them, on demand\n",
           "| workload | backend | hit rate | recomputed | resident prefix tokens | vs radix | "
           "compress+restore s | compressions (kept-blob reuses) | encodes | recompute s saved |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for (w, b), r in by.items():
        base = by[(w, "radix")]
        saved = (base["recomputed_tokens"] - r["recomputed_tokens"]) * r["prefill_ms_per_token"] / 1e3
        out.append(
            f"| {w} | {b} | {100 * r['hit_rate']:.1f}% | {r['recomputed_tokens']} | {r['resident_prefix_tokens']} | "
            f"{r['resident_prefix_tokens'] / max(1, base['resident_prefix_tokens']):.1f}x | "
            f"{r['compress_seconds'] + r['restore_seconds']:.1f} | {r['compressions']} ({r['reused_blobs']}) | "
            f"{r['encodes']} | {saved:.1f} |"
        )
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    by = {(r["workload"], r["backend"]): r for r in rows}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, label in ((axes[0], "resident_prefix_tokens", "resident prefix tokens at the end"),
                           (axes[1], "hit_rate", "prefix hit rate (tokens)")):
        for i, backend in enumerate(("radix", "kvtc")):
            vals = [by[(w, backend)][key] for w in workloads]
            ax.bar([j + 0.4 * i for j in range(len(workloads))], vals, width=0.4, label=backend)
        ax.set_xticks([j + 0.2 for j in range(len(workloads))], workloads)
        ax.set_title(label)
    axes[0].legend()
    fig.suptitle("SmolLM2-135M, same KV pool for both: SGLang RadixCache vs KVTCRadixCache (16x)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
