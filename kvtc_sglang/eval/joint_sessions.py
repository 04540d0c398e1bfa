"""Joint encoding probe, the sessions: real text read after different histories, prefilled by the real model, and
continuations scored against the exact cache when a span's KV is replaced.

A session is ``prefix + file[:n]`` (the context), then ``file[n : n + C]`` teacher-forced (the continuation). Two
sessions that read the same file after different prefixes hold two copies of the file's KV; a prefix of another
length puts the copy at another offset.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..calibration.corpus import documents
from ..calibration.model import LoadedModel, kv_dtype, prefill_kv
from .harness import continuation_logprobs


@dataclass(frozen=True)
class Session:
    """One prefilled context: ``ids [P + n + C + 1]``, its K/V ``[L, P + n, H, D]`` and the model's cache of it."""

    ids: torch.Tensor
    prefix: int
    file_tokens: int
    k: torch.Tensor
    v: torch.Tensor
    cache: object
    ref_logp: torch.Tensor  # [C, vocab]: the continuation's log-probs on the exact cache

    @property
    def context(self) -> int:
        return self.prefix + self.file_tokens


def token_docs(
    lm: LoadedModel, split: str, kind: str, count: int, *, min_tokens: int, skip: int = 0
) -> list[torch.Tensor]:
    """The first ``count`` documents of ``kind`` in ``split`` (after ``skip``) that tokenize to at least
    ``min_tokens`` tokens: ``[>= min_tokens]`` id tensors."""
    out: list[torch.Tensor] = []
    for doc in documents(split, kind):
        ids = lm.tokenizer(doc.text)["input_ids"]
        if len(ids) >= min_tokens:
            if skip:
                skip -= 1
                continue
            out.append(torch.tensor(ids, dtype=torch.long))
            if len(out) == count:
                return out
    raise RuntimeError(f"{split} split has {len(out)} {kind} documents of >= {min_tokens} tokens, need {count}")


def open_session(lm: LoadedModel, prefix: torch.Tensor, file: torch.Tensor, file_tokens: int, cont: int) -> Session:
    """Prefill ``prefix + file[:file_tokens]`` (KV rounded to the model's KV dtype, as a pool holds it) and score the
    next ``cont`` tokens of the file on the exact cache."""
    if file.numel() < file_tokens + cont + 1:
        raise ValueError(f"file has {file.numel()} tokens, the session needs {file_tokens + cont + 1}")
    ids = torch.cat([prefix, file[: file_tokens + cont + 1]])
    ctx = prefix.numel() + file_tokens
    k, v, cache = prefill_kv(lm.model, ids[:ctx], kv_dtype(lm.spec))  # [L, T, H, D]
    ref = continuation_logprobs(lm, copy.deepcopy(cache), ids[ctx : ctx + cont])  # [C, vocab]
    return Session(ids, prefix.numel(), file_tokens, k, v, cache, ref)


@dataclass
class Score:
    """Running sums of one method's continuations against the exact cache."""

    tokens: int = 0
    top1: int = 0
    kl: float = 0.0
    nll: float = 0.0
    ref_nll: float = 0.0
    coded_tokens: int = 0
    nbytes: int = 0
    pairs: int = 0

    def report(self, raw_bytes_per_token: int) -> dict:
        out = {
            "mean_kl": self.kl / self.tokens,
            "top1": self.top1 / self.tokens,
            "nll_change_pct": 100.0 * (self.nll / self.ref_nll - 1.0),
            "tokens_scored": self.tokens,
            "pairs": self.pairs,
        }
        if self.coded_tokens and self.nbytes:
            out["bytes_per_token"] = self.nbytes / self.coded_tokens
            out["ratio"] = raw_bytes_per_token * self.coded_tokens / self.nbytes
        return out


@torch.inference_mode()
def score(lm: LoadedModel, s: Session, k_new: torch.Tensor, v_new: torch.Tensor, *, region: tuple[int, int],
          tallies: list[Score], nbytes: int | None = None) -> None:
    """Put ``k_new, v_new [L, hi - lo, H, D]`` into tokens ``region = [lo, hi)`` of a copy of the session's cache,
    run the continuation and add its KL, top-1 and NLL against the exact cache (and ``nbytes``) to every tally."""
    lo, hi = region
    mod = copy.deepcopy(s.cache)
    for i, layer in enumerate(mod.layers):
        layer.keys[0, :, lo:hi] = k_new[i].transpose(0, 1).to(layer.keys.dtype)  # [T, H, D] -> [H, T, D]
        layer.values[0, :, lo:hi] = v_new[i].transpose(0, 1).to(layer.values.dtype)
    cont = s.ref_logp.shape[0]
    out = continuation_logprobs(lm, mod, s.ids[s.context : s.context + cont])
    tgt = s.ids[s.context + 1 : s.context + cont + 1, None]
    top1 = int((out.argmax(-1) == s.ref_logp.argmax(-1)).sum())
    kl = float((s.ref_logp.exp() * (s.ref_logp - out)).sum())
    nll, ref_nll = -float(out.gather(1, tgt).sum()), -float(s.ref_logp.gather(1, tgt).sum())
    for tally in tallies:
        tally.tokens += cont
        tally.top1 += top1
        tally.kl += kl
        tally.nll += nll
        tally.ref_nll += ref_nll
        tally.pairs += 1
        if nbytes is not None:
            tally.coded_tokens += hi - lo
            tally.nbytes += nbytes
