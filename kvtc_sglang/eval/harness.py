"""Teacher-forced evaluation of a compressed KV cache against the uncompressed one.

For each held-out segment: prefill ``context`` tokens, compress tokens ``[sinks, context - window)``
with a method, write the reconstruction back into the cache, then run the next ``continuation``
tokens teacher-forced and compare the next-token distributions with the uncompressed run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from ..calibration.corpus import token_sequences
from ..calibration.model import LoadedModel, kv_dtype, prefill_kv
from .methods import Method


@dataclass(frozen=True)
class EvalConfig:
    context: int = 1024
    continuation: int = 256
    sinks: int = 4
    window: int = 128
    segments_per_kind: int = 3
    kinds: tuple[str, ...] = ("prose", "code", "perl")  # evaluation domains (corpus.KINDS)
    # "calibration" + skip_segments: calibration-side text past what a calibration read (for choosing settings)
    split: str = "evaluation"
    skip_segments: int = 0

    def __post_init__(self) -> None:
        if not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must be distinct and non-empty, got {self.kinds}")
        if self.context < self.sinks + self.window + 1:
            raise ValueError(f"context {self.context} leaves nothing to compress after {self.sinks}+{self.window}")
        if self.continuation < 1 or self.segments_per_kind < 1:
            raise ValueError("continuation and segments_per_kind must be >= 1")


@dataclass
class Tally:
    """Running sums for one method over all segments."""

    tokens: int = 0
    top1: int = 0
    kl: float = 0.0
    nll: float = 0.0
    ref_nll: float = 0.0
    compressed_tokens: int = 0
    bits_before: float = 0.0
    bits_after: float | None = 0.0
    # per layer [L]: summed squared error of the reconstruction, and summed squared original
    sq_err: dict[str, torch.Tensor] = field(default_factory=dict)
    sq_norm: dict[str, torch.Tensor] = field(default_factory=dict)

    def add_layer_errors(self, name: str, orig: torch.Tensor, rec: torch.Tensor) -> None:
        """Accumulate per-layer squared error of ``rec`` vs ``orig`` (both ``[L, T, H, D]``)."""
        err = (rec.float() - orig.float()).pow(2).flatten(1).sum(1).double()  # [L]
        norm = orig.float().pow(2).flatten(1).sum(1).double()  # [L]
        self.sq_err[name] = self.sq_err.get(name, 0) + err
        self.sq_norm[name] = self.sq_norm.get(name, 0) + norm

    def report(self, num_features: int) -> dict:
        raw_bits = 16.0 * 2 * num_features * self.compressed_tokens
        ppl = float(torch.tensor(self.nll / self.tokens).exp())
        ref_ppl = float(torch.tensor(self.ref_nll / self.tokens).exp())
        k_rel = (self.sq_err["k"] / self.sq_norm["k"]).sqrt().tolist()
        v_rel = (self.sq_err["v"] / self.sq_norm["v"]).sqrt().tolist()
        return {
            "ratio_before_entropy": raw_bits / self.bits_before,
            "ratio_after_entropy": raw_bits / self.bits_after if self.bits_after else None,
            "top1_agreement": self.top1 / self.tokens,
            "mean_kl": self.kl / self.tokens,
            "perplexity": ppl,
            "perplexity_ref": ref_ppl,
            "perplexity_change_pct": 100.0 * (ppl / ref_ppl - 1.0),
            "k_rel_err_per_layer": k_rel,
            "v_rel_err_per_layer": v_rel,
            "tokens_scored": self.tokens,
            "tokens_compressed": self.compressed_tokens,
        }


def eval_segments(lm: LoadedModel, cfg: EvalConfig) -> list[tuple[str, torch.Tensor]]:
    """Held-out ``[context + continuation + 1]`` id sequences: ``segments_per_kind`` of each of ``cfg.kinds``."""
    out = []
    n = cfg.context + cfg.continuation + 1
    for kind in cfg.kinds:
        want = cfg.skip_segments + cfg.segments_per_kind
        seqs, _ = token_sequences(lm.tokenizer, cfg.split, kind, n, n * want)
        if len(seqs) < want:
            raise RuntimeError(f"{cfg.split} split has {len(seqs)} {kind} segments of {n} tokens, need {want}")
        out.extend((kind, s) for s in seqs[cfg.skip_segments :])
    return out


@torch.inference_mode()
def continuation_logprobs(lm: LoadedModel, cache: object, ids: torch.Tensor) -> torch.Tensor:
    """Run ``ids [C]`` on top of ``cache`` (which grows by them): ``[C, vocab]`` float32 log-probs."""
    return lm.model(ids[None, :], past_key_values=cache, use_cache=True).logits[0].float().log_softmax(-1)


@torch.inference_mode()
def evaluate(lm: LoadedModel, cfg: EvalConfig, methods: dict[str, tuple[Method, bool]]) -> dict[str, dict]:
    """Run every method on every segment; ``methods[name] = (method, exempt_sinks)``.

    Each method's report also holds ``domains[kind]``: the same report over that domain's segments.
    """
    tallies = {name: Tally() for name in methods}
    per_kind = {(name, kind): Tally() for name in methods for kind in cfg.kinds}
    for kind, ids in eval_segments(lm, cfg):
        ctx, cont, tgt = ids[: cfg.context], ids[cfg.context : -1], ids[cfg.context + 1 :]
        k, v, cache = prefill_kv(lm.model, ctx, kv_dtype(lm.spec))  # [L, T, H, D] in the KV dtype
        ref = continuation_logprobs(lm, copy.deepcopy(cache), cont)  # [C, vocab] log-probs
        ref_nll = -ref.gather(1, tgt[:, None]).sum().item()
        positions = torch.arange(cfg.context)
        for name, (method, exempt_sinks) in methods.items():
            s0, s1 = (cfg.sinks if exempt_sinks else 0), cfg.context - cfg.window
            res = method(k[:, s0:s1], v[:, s0:s1], positions[s0:s1])
            mod = copy.deepcopy(cache)
            for layer_idx, layer in enumerate(mod.layers):
                layer.keys[0, :, s0:s1] = res.k[layer_idx].transpose(0, 1).to(layer.keys.dtype)  # [H, T, D]
                layer.values[0, :, s0:s1] = res.v[layer_idx].transpose(0, 1).to(layer.values.dtype)
            out = continuation_logprobs(lm, mod, cont)
            for t in (tallies[name], per_kind[(name, kind)]):
                t.tokens += cont.numel()
                t.top1 += int((out.argmax(-1) == ref.argmax(-1)).sum())
                t.kl += float((ref.exp() * (ref - out)).sum())
                t.nll += -out.gather(1, tgt[:, None]).sum().item()
                t.ref_nll += ref_nll
                t.compressed_tokens += s1 - s0
                t.bits_before += res.bits_before_entropy
                if res.bits_after_entropy is None or t.bits_after is None:
                    t.bits_after = None
                else:
                    t.bits_after += res.bits_after_entropy
                t.add_layer_errors("k", k[:, s0:s1], res.k)
                t.add_layer_errors("v", v[:, s0:s1], res.v)
    reports = {name: t.report(lm.spec.num_features) for name, t in tallies.items()}
    for name, rep in reports.items():
        rep["domains"] = {kind: per_kind[(name, kind)].report(lm.spec.num_features) for kind in cfg.kinds}
    return reports
