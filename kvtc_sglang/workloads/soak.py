"""Soak run: a long randomized workload over the real SGLang pool, allocator and ``KVTCRadixCache``.

Several requests hold their prefixes locked at once; idle compression, pressure compression, eviction,
restores and insert-through-compressed all happen. Every ``--check-every`` steps the accounting invariants
are checked (no leaked or double-freed slot, sizes add up, compressed nodes unlocked, sinks never
compressed), and every finishing request's prefix is read back from the pool and compared with the K/V
that was written for it (real SmolLM2 K/V of held-out text)::

    python -m kvtc_sglang.workloads.soak --artifact artifacts/smollm2-135m-instruct.r16.kvtc.safetensors \
        --steps 20000
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from ..cache.config import KVTCCacheConfig
from ..calibration.corpus import token_sequences
from ..calibration.model import load_default_model, prefill_kv
from ..codec import KVTCCodec, load_artifact
from .invariants import check_invariants
from .replay import BankKV, Driver, build_cache, build_pool, random_workload


@dataclass(frozen=True)
class SoakConfig:
    steps: int = 20000
    pool_tokens: int = 3072
    page_size: int = 1
    holders: int = 4  # requests holding locks at once
    seed: int = 0
    check_every: int = 100


def soak(codec: KVTCCodec, bank: BankKV, run: SoakConfig) -> dict:
    """Run the workload; raises ``RuntimeError`` on the first broken invariant or wrong prefix."""
    steps, pool_tokens, page_size, holders, check_every = (
        run.steps,
        run.pool_tokens,
        run.page_size,
        run.holders,
        run.check_every,
    )
    rng = random.Random(run.seed)
    _, allocator = build_pool(codec.spec, pool_tokens, page_size)
    cfg = KVTCCacheConfig(calibration="soak", window_tokens=16, idle_seconds=0.0, store_fraction=0.3,
                          encode="inline")
    cache = build_cache(allocator, page_size, codec, cfg)
    drv = Driver(cache, bank)
    running, checks, worst = [], 0, 0.0
    t0 = time.perf_counter()
    for step, (seq, u) in enumerate(random_workload(rng, steps, 64, bank.k.shape[1])):
        req = drv.start(seq)
        if req is not None:
            running.append(req)
        release = 1 if (running and u < 0.3) else 0
        while running and (len(running) > holders or release):
            release = 0
            done = running.pop(rng.randrange(len(running)))
            n, k, v = drv.read_prefix(done.tokens)
            if n < len(done.tokens) // page_size * page_size:
                raise RuntimeError(f"step {step}: a locked request's prefix shrank from {len(done.tokens)} to {n}")
            err = max(_rel(k, bank.k[:, :n]), _rel(v, bank.v[:, :n])) if n else 0.0
            worst = max(worst, err)
            if err > 0.5:
                raise RuntimeError(f"step {step}: restored prefix differs from what was written (rel. err {err:.3f})")
            drv.finish(done)
        if step % 5 == 0:
            cache.compress_idle(now=float("inf"))
        if step % check_every == 0:
            check_invariants(cache)
            checks += 1
    for req in running:
        drv.finish(req)
    check_invariants(cache)
    return {
        "steps": steps,
        "invariant_checks": checks + 1,
        "worst_rel_err": round(worst, 4),
        "hit_tokens": drv.hit_tokens,
        "computed_tokens": drv.computed_tokens,
        "no_memory": drv.failed,
        "seconds": round(time.perf_counter() - t0, 1),
        **cache.stats.as_dict(),
    }


def _rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6))


def main() -> None:
    ap = argparse.ArgumentParser(description="KVTCRadixCache soak run (CPU, real SGLang classes)")
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--pool-tokens", type=int, default=3072)
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--holders", type=int, default=4, help="requests holding locks at once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-every", type=int, default=100)
    args = ap.parse_args()
    lm = load_default_model()
    (ids,), _ = token_sequences(lm.tokenizer, "evaluation", "prose", 512, 512)
    k, v, _ = prefill_kv(lm.model, ids)
    codec = KVTCCodec(load_artifact(args.artifact, expect=lm.spec))
    run = SoakConfig(args.steps, args.pool_tokens, args.page_size, args.holders, args.seed, args.check_every)
    out = soak(codec, BankKV(k, v), run)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
