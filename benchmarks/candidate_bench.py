"""Compression candidates on a big tree: kept list vs a walk on every ``evict`` (issue 12, defect 5).

SGLang calls ``tree_cache.evict`` on every decode step while the pool is short, mostly on a tree that
did not change since the last call. This builds a real ``KVTCRadixCache`` (real SGLang pool, real SmolLM2
K/V) with many nodes -- a few long compressible conversations plus thousands of short cached requests
that are only walked over -- then issues the same series of small ``evict`` calls (each compresses one
node's span) with the kept candidate list (default) and with a full walk per call (the old way), and
prints the walks and their seconds per call as a ratio in one run::

    python benchmarks/candidate_bench.py --artifact $T/smollm2-135m-instruct.r16.kvtc.safetensors
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.cache.tree_walk import subtree_postorder
from kvtc_sglang.calibration.corpus import token_sequences
from kvtc_sglang.calibration.model import load_default_model, prefill_kv
from kvtc_sglang.codec import KVTCCodec, load_artifact
from kvtc_sglang.workloads.replay import BankKV, Driver, build_cache, build_pool


def build(codec: KVTCCodec, bank: BankKV, args: argparse.Namespace, reuse: bool):
    """A cache holding ``args.trunks`` long sequences and ``args.short`` short ones, all unlocked."""
    _, allocator = build_pool(codec.spec, args.pool_tokens, 1)
    cfg = KVTCCacheConfig(calibration=str(args.artifact), idle_seconds=1e9)
    cache = build_cache(allocator, 1, codec, cfg)
    cache.policy.reuse_candidates = reuse
    drv = Driver(cache, bank)
    rng = random.Random(0)
    for t in range(args.trunks):
        drv.finish(drv.start([50_000 + t] + [rng.randrange(1, 49_000) for _ in range(args.trunk_tokens - 1)]))
    for _ in range(args.short):  # random 3-token requests: a bushy tree of nodes with nothing to compress
        drv.finish(drv.start([rng.randrange(1, 49_000) for _ in range(3)]))
    return cache


def run(cache, calls: int, tokens: int) -> dict:
    pol = cache.policy
    walks0, secs0 = pol.candidate_walks, pol.candidate_seconds
    t0 = time.perf_counter()
    freed = sum(cache.evict(EvictParams(num_tokens=tokens)).num_tokens_evicted for _ in range(calls))
    return {
        "evict_calls": calls,
        "walks": pol.candidate_walks - walks0,
        "walk_seconds": pol.candidate_seconds - secs0,
        "evict_seconds": time.perf_counter() - t0,
        "freed": freed,
        "nodes": len(subtree_postorder(cache.root_node)),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--pool-tokens", type=int, default=110_000)
    p.add_argument("--trunks", type=int, default=40)
    p.add_argument("--trunk-tokens", type=int, default=1024)
    p.add_argument("--short", type=int, default=20_000, help="3-token requests (tree size)")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--tokens", type=int, default=16, help="slots each evict call asks for")
    args = p.parse_args()
    lm = load_default_model(compute_dtype=torch.float32)
    (ids,), _ = token_sequences(lm.tokenizer, "evaluation", "prose", args.trunk_tokens, args.trunk_tokens)
    k, v, _ = prefill_kv(lm.model, ids, torch.bfloat16)  # [L, T, H, D] real K/V, token at depth d -> column d
    codec = KVTCCodec(load_artifact(args.artifact, expect=lm.spec))
    rows = {}
    for name, reuse in (("kept list (default)", True), ("walk every call (old)", False)):
        cache = build(codec, BankKV(k, v), args, reuse)
        rows[name] = run(cache, args.calls, args.tokens)
        print(name, rows[name], flush=True)
    print("\n| candidates | tree nodes | evict calls | walks | walk s per call | evict s per call | freed slots |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        n = r["evict_calls"]
        print(f"| {name} | {r['nodes']} | {n} | {r['walks']} | {r['walk_seconds'] / n:.4f} "
              f"| {r['evict_seconds'] / n:.4f} | {r['freed']} |")
    new, old = rows["kept list (default)"], rows["walk every call (old)"]
    if new["freed"] != old["freed"]:
        raise RuntimeError(f"both modes must free the same slots, got {new['freed']} and {old['freed']}")
    ratio = old["walk_seconds"] / max(new["walk_seconds"], 1e-9)
    print(f"\nwalk time, old / kept: {ratio:.1f}x; evict time, old / kept: "
          f"{old['evict_seconds'] / new['evict_seconds']:.2f}x")


if __name__ == "__main__":
    main()
