"""End-to-end check of the serving path: real model K/V through SGLang's pool and ``KVTCRadixCache``.

Each turn: match the cached prefix and load back its compressed part (``init_load_back``, as SGLang's
admission does; restored nodes keep their blob), read the prefix K/V
from the pool exactly as attention would, run the model on the new tokens on top of it (which also
yields their K/V, written back to the pool), insert, then let the cache compress what went cold. The
logits of the new tokens are compared with an uncompressed full prefill of the same sequence. The model may
compute in a wider dtype than the pool (fp32 model, bf16 pool, as SGLang's CPU server runs): new K/V are
rounded to the pool's dtype when written, as the server's pool does.

Scenarios (real held-out text):
- ``multi_turn``: one conversation whose every turn re-sends all previous turns;
- ``shared_prompt``: one long system prompt, then several short user turns that share it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from transformers import DynamicCache

from ..cache.config import KVTCCacheConfig
from ..calibration.corpus import token_sequences
from ..calibration.model import LoadedModel, cache_to_kv
from ..codec import KVTCCodec
from ..workloads.invariants import check_invariants
from ..workloads.replay import Driver, build_cache, build_pool


@dataclass(frozen=True)
class ServingEvalConfig:
    """Sizes of the two scenarios (tokens) and the pool."""

    turns: int = 4
    turn_tokens: int = 192
    system_tokens: int = 512
    users: int = 6
    user_tokens: int = 48
    pool_tokens: int = 8192
    page_size: int = 1

    def __post_init__(self) -> None:
        for name in ("turns", "turn_tokens", "system_tokens", "users", "user_tokens", "pool_tokens", "page_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def _to_cache(model, k: torch.Tensor, v: torch.Tensor) -> DynamicCache:
    """``[L, T, H, D]`` K/V -> a transformers cache of batch 1."""
    cache = DynamicCache(config=model.config)
    for layer in range(k.shape[0]):
        k_l = k[layer].transpose(0, 1)[None].to(model.dtype)  # [T, H, D] -> [1, H, T, D] in the compute dtype
        cache.update(k_l, v[layer].transpose(0, 1)[None].to(model.dtype), layer)
    return cache


@torch.inference_mode()
def _turn(lm: LoadedModel, drv: Driver, tokens: list[int], tally: dict) -> None:
    adm = drv.admit(tokens)
    n = adm.matched
    ids = torch.tensor(tokens)
    if n == len(tokens):  # nothing new to score; keep the flow going
        n = max(0, n - 1)
    if n:
        t0 = time.perf_counter()
        lm.model(ids[None, :n])  # what recomputing the reused prefix would cost on this machine
        tally["recompute_seconds"] += time.perf_counter() - t0
    k_pre, v_pre = drv.kv.gather(adm.prefix_slots[:n])  # [L, n, H, D] from the pool (restored pages)
    past = _to_cache(lm.model, k_pre, v_pre) if n else None
    out = lm.model(ids[None, n:], past_key_values=past, use_cache=True)
    logp = out.logits[0].float().log_softmax(-1)  # [T - n, vocab]
    ref = lm.model(ids[None, :]).logits[0, n:].float().log_softmax(-1)  # uncompressed full prefill
    k_all, v_all = cache_to_kv(out.past_key_values)  # [L, T, H, D] in the compute dtype
    k_all, v_all = k_all.to(drv.kv.dtype), v_all.to(drv.kv.dtype)  # what the KV pool stores
    tally["tokens"] += len(tokens) - n
    tally["top1"] += int((logp.argmax(-1) == ref.argmax(-1)).sum())
    tally["kl"] += float((ref.exp() * (ref - logp)).sum())
    tally["reused"] += n
    req = drv.commit(adm, k_all[:, adm.matched :], v_all[:, adm.matched :])
    if req is not None:
        drv.finish(req)


def _scenario_tokens(lm: LoadedModel, cfg: ServingEvalConfig, scenario: str) -> list[list[int]]:
    if scenario == "multi_turn":
        segs, _ = token_sequences(lm.tokenizer, "evaluation", "prose", cfg.turn_tokens, cfg.turn_tokens * cfg.turns)
        turns = [s.tolist() for s in segs[: cfg.turns]]
        return [sum(turns[: i + 1], []) for i in range(len(turns))]
    if scenario == "shared_prompt":
        (system,), _ = token_sequences(lm.tokenizer, "evaluation", "code", cfg.system_tokens, cfg.system_tokens)
        users, _ = token_sequences(lm.tokenizer, "evaluation", "prose", cfg.user_tokens, cfg.user_tokens * cfg.users)
        return [system.tolist() + u.tolist() for u in users[: cfg.users]]
    raise ValueError(f"scenario must be 'multi_turn' or 'shared_prompt', got {scenario!r}")


def serving_eval(lm: LoadedModel, codec: KVTCCodec, cache_cfg: KVTCCacheConfig, cfg: ServingEvalConfig,
                 scenario: str) -> dict:
    """Run one scenario; returns top-1 agreement and mean KL of the new tokens vs uncompressed, and the
    cache's counters (compressed/restored tokens, achieved ratio)."""
    _, allocator = build_pool(codec.spec, cfg.pool_tokens, cfg.page_size)
    cache = build_cache(allocator, cfg.page_size, codec, replace(cache_cfg, encode="inline"))  # deterministic
    drv = Driver(cache, source=None)
    tally = {"tokens": 0, "top1": 0, "kl": 0.0, "reused": 0, "recompute_seconds": 0.0}
    ratios = []
    t0 = time.perf_counter()
    for tokens in _scenario_tokens(lm, cfg, scenario):
        _turn(lm, drv, tokens, tally)
        cache.compress_idle(now=float("inf"))  # everything idle: the next turn meets compressed nodes
        if cache.stats.resident_blob_bytes:
            ratios.append(cache.stats.ratio)
        check_invariants(cache)
    s = cache.stats
    return {
        "scenario": scenario,
        "scored_tokens": tally["tokens"],
        "top1_agreement": tally["top1"] / tally["tokens"],
        "mean_kl": tally["kl"] / tally["tokens"],
        "reused_tokens": tally["reused"],
        "restored_tokens": s.restored_tokens,
        "compressed_tokens": s.compressed_tokens,
        "encoded_tokens": s.compressed_tokens - s.reused_tokens,  # kept blobs are not encoded again
        "ratio": sum(ratios) / len(ratios) if ratios else 0.0,
        "compress_seconds": s.compress_seconds,
        "restore_seconds": s.restore_seconds,
        "restore_ms_per_token": 1e3 * s.restore_seconds / max(1, s.restored_tokens),
        "recompute_ms_per_token": 1e3 * tally["recompute_seconds"] / max(1, tally["reused"]),
        "seconds": time.perf_counter() - t0,
    }


def format_table(rows: list[dict]) -> str:
    """Markdown table of :func:`serving_eval` results."""
    lines = [
        "| scenario | scored tokens | reused | restored | compressed | ratio | top-1 | mean KL | compress s | "
        "restore ms/token | recompute ms/token |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['scenario']} | {r['scored_tokens']} | {r['reused_tokens']} | {r['restored_tokens']} | "
            f"{r['compressed_tokens']} | {r['ratio']:.1f}x | {100 * r['top1_agreement']:.1f}% | {r['mean_kl']:.4f} | "
            f"{r['compress_seconds']:.2f} | "
            f"{r['restore_ms_per_token']:.3f} | {r['recompute_ms_per_token']:.3f} |"
        )
    return "\n".join(lines)
