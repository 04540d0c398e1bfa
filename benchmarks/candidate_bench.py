"""Compression candidates on a big tree: the per-node LRU index vs a walk and sort of the whole tree per
scheduler step (issue 18, defect 3).

SGLang's admission locks and unlocks the prefix of every request it probes, every pass; the old cache bumped
a tree version on each unlock, so the next ``evict`` walked and sorted the whole tree again. This builds a
real ``KVTCRadixCache`` (real SGLang pool, real SmolLM2 K/V) with many nodes -- a few long compressible
conversations plus thousands of short cached requests that are only walked over -- then runs the same
series of steps both ways: lock and unlock ``--probes`` random cached paths (admission), then list the
coldest spans for one background job (``--tokens``) from the index (``policy.take``, what the tick does) or
from a full walk (``tree_walk.compress_candidates``, the old way). Both must name the same spans; the
seconds per step are printed as a ratio in one run::

    python benchmarks/candidate_bench.py --artifact $T/smollm2-135m-instruct.r16.kvtc.safetensors
"""

from __future__ import annotations

import argparse
import random
import time
from array import array
from pathlib import Path

import torch
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.cache.tree_walk import compress_candidates, subtree_postorder
from kvtc_sglang.calibration.corpus import token_sequences
from kvtc_sglang.calibration.model import load_default_model, prefill_kv
from kvtc_sglang.codec import KVTCCodec, load_artifact
from kvtc_sglang.workloads.replay import BankKV, Driver, build_cache, build_pool


def build(codec: KVTCCodec, bank: BankKV, args: argparse.Namespace):
    """A cache holding ``args.trunks`` long sequences and ``args.short`` short ones, all unlocked; returns the
    cache and the token lists (for probes)."""
    _, allocator = build_pool(codec.spec, args.pool_tokens, 1)
    cfg = KVTCCacheConfig(calibration=str(args.artifact), encode="inline", idle_watermark=0.99)  # no encodes
    cache = build_cache(allocator, 1, codec, cfg)
    drv = Driver(cache, bank)
    rng = random.Random(0)
    seqs = []
    for t in range(args.trunks):
        seqs.append([50_000 + t] + [rng.randrange(1, 49_000) for _ in range(args.trunk_tokens - 1)])
        drv.finish(drv.start(seqs[-1]))
    for _ in range(args.short):  # random 3-token requests: a bushy tree of nodes with nothing to compress
        seqs.append([rng.randrange(1, 49_000) for _ in range(3)])
        drv.finish(drv.start(seqs[-1]))
    return cache, seqs


def probe(cache, seqs: list[list[int]], rng: random.Random, n: int) -> None:
    """What admission does for ``n`` waiting requests: match, lock, unlock."""
    for _ in range(n):
        m = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", rng.choice(seqs)))))
        cache.dec_lock_ref(m.last_device_node) if cache.inc_lock_ref(m.last_device_node) else None


def run(cache, seqs: list[list[int]], steps: int, probes: int, tokens: int) -> dict:
    pol = cache.policy
    rng = random.Random(1)
    index_s = walk_s = 0.0
    same = 0
    for _ in range(steps):
        probe(cache, seqs, rng, probes)
        t0 = time.perf_counter()
        taken = pol.take(tokens, cache.guards.busy)
        index_s += time.perf_counter() - t0
        for node, *_ in taken:
            pol.candidates.add(node)  # nothing is encoded here: the index keeps them
        t0 = time.perf_counter()
        walked, planned = [], 0
        for span in compress_candidates(cache.root_node, pol.sink_end, pol.window, pol.page_size, pol.min_tokens):
            if planned >= tokens:
                break
            if not cache.guards.busy(span[0]):
                walked.append(span)
                planned += span[3] - span[2]
        walk_s += time.perf_counter() - t0
        same += [(id(n), lo, hi) for n, _, lo, hi in taken] == [(id(n), lo, hi) for n, _, lo, hi in walked]
    return {"steps": steps, "index_seconds": index_s, "walk_seconds": walk_s, "same_spans": same,
            "nodes": len(subtree_postorder(cache.root_node))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--pool-tokens", type=int, default=110_000)
    p.add_argument("--trunks", type=int, default=40)
    p.add_argument("--trunk-tokens", type=int, default=1024)
    p.add_argument("--short", type=int, default=20_000, help="3-token requests (tree size)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--probes", type=int, default=16, help="waiting requests admission probes per step")
    p.add_argument("--tokens", type=int, default=4096, help="tokens one background job asks for")
    args = p.parse_args()
    lm = load_default_model(compute_dtype=torch.float32)
    (ids,), _ = token_sequences(lm.tokenizer, "evaluation", "prose", args.trunk_tokens, args.trunk_tokens)
    k, v, _ = prefill_kv(lm.model, ids, torch.bfloat16)  # [L, T, H, D] real K/V, token at depth d -> column d
    codec = KVTCCodec(load_artifact(args.artifact, expect=lm.spec))
    cache, seqs = build(codec, BankKV(k, v), args)
    r = run(cache, seqs, args.steps, args.probes, args.tokens)
    n = r["steps"]
    print("| candidates | tree nodes | steps (probes each) | s per step | same spans |")
    print("|---|---|---|---|---|")
    print(f"| per-node LRU index (now) | {r['nodes']} | {n} ({args.probes}) | {r['index_seconds'] / n:.5f} "
          f"| {r['same_spans']}/{n} |")
    print(f"| walk + sort per step (old) | {r['nodes']} | {n} ({args.probes}) | {r['walk_seconds'] / n:.5f} | - |")
    if r["same_spans"] != n:
        raise RuntimeError(f"the index and the walk named different spans in {n - r['same_spans']} of {n} steps")
    print(f"\nwalk / index time per step: {r['walk_seconds'] / max(r['index_seconds'], 1e-9):.1f}x")


if __name__ == "__main__":
    main()
