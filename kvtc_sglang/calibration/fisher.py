"""KL sensitivity of every cached K/V feature: the diagonal Fisher information (docs/history/accuracy.md, lever 3).

A small error ``d`` in the cached K/V of a prefix changes the model's next-token distributions of the
tokens that follow by ``KL ~ 1/2 d^T F d``, with ``F = E_y[g g^T]`` the Fisher information of the cached
features (``g`` the gradient of ``log p(y)`` with respect to them, ``y`` drawn from the model itself).
Its diagonal is a per-feature weight in KL units for keys and values alike, so whitening both streams by
``sqrt(diag F)`` (one normalisation for both) makes the DP's squared errors commensurate with each other
and with what the model's output sees: per layer, per head, per feature and between K and V. It covers
what the closed-form metrics leave out (attention weights, ``W_o``, the layers above).

Estimate: a sequence's first ``P`` tokens are prefilled (no gradient); their cache becomes a leaf; the
next ``C`` tokens run on it, one token ``y_m`` is sampled from each of their ``C`` distributions, and
``sum_m log p(y_m)`` is differentiated with respect to the cache. The ``y_m`` are independent given
the teacher-forced context and each score has mean zero, so the square of the summed gradient is an
unbiased estimate of ``sum_m diag F_m``. Key gradients are taken into the codec's RoPE-removed frame
(``k = R(n) k_un`` gives ``g_un = R(n)^T g``, which is what :func:`remove_rope` applies).
"""

from __future__ import annotations

from typing import Any

import torch

from ..codec.rope import remove_rope
from ..codec.spec import DTYPES, ModelSpec
from .model import round_cache


class FisherMoments:
    """Running ``sum g^2`` of cached K and V features, ``[F]`` float64 each (``F`` ordered ``(L, H, D)``)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.sum = {s: torch.zeros(spec.num_features, dtype=torch.float64) for s in ("k", "v")}
        self.count = 0  # prefix tokens summed

    def update(self, model: torch.nn.Module, ids: torch.Tensor, continuation: int, keep_from: int,
               generator: torch.Generator) -> None:  # fmt: skip
        """Add one sequence ``ids [T]``: prefix ``[0, T - continuation)``, tokens from ``keep_from`` counted."""
        from transformers import DynamicCache  # noqa: PLC0415  (heavy import)

        prefix = ids.numel() - continuation
        _check(ids.numel(), prefix, keep_from)
        with torch.no_grad():
            out = model(ids[None, :prefix], past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        round_cache(out.past_key_values, DTYPES[self.spec.dtype])  # what the KV pool holds
        self.update_from_cache(model, out.past_key_values, ids, prefix, keep_from=keep_from, generator=generator)

    def update_from_cache(self, model: torch.nn.Module, cache: Any, ids: torch.Tensor, prefix: int, *, keep_from: int,
                          generator: torch.Generator) -> None:  # fmt: skip
        """Add one sequence ``ids [T]`` whose first ``prefix`` tokens are already in ``cache`` (a transformers
        cache of at least ``prefix`` tokens, rounded to the KV dtype, e.g. the calibration's own prefill: no
        second forward pass). ``cache`` is not modified; tokens ``[prefix, T)`` are the continuation."""
        sums, count = sequence_scores(model, self.spec, cache, ids, prefix, keep_from=keep_from, generator=generator)
        self.add(sums, count)

    def add(self, sums: dict[str, torch.Tensor], count: int) -> None:
        """Add the output of :func:`sequence_scores`."""
        for s in ("k", "v"):
            self.sum[s] += sums[s]
        self.count += count

    def diag(self, stream: str) -> torch.Tensor:
        """Mean squared score per prefix token, ``[L, H, D]`` float64, of stream ``"k"`` or ``"v"``."""
        if self.count == 0:
            raise RuntimeError("no Fisher statistics were collected (fisher_continuation is 0)")
        s = self.spec
        return (self.sum[stream] / self.count).reshape(s.num_layers, s.num_kv_heads, s.head_dim)


def _check(num_t: int, prefix: int, keep_from: int) -> None:
    if not 0 <= keep_from < prefix < num_t:
        raise ValueError(
            f"need 0 <= keep_from < prefix < T (continuation >= 1); got T={num_t}, prefix={prefix}, "
            f"keep_from={keep_from}"
        )


def sequence_scores(model: torch.nn.Module, spec: ModelSpec, cache: Any, ids: torch.Tensor, prefix: int, *,
                    keep_from: int, generator: torch.Generator) -> tuple[dict[str, torch.Tensor], int]:  # fmt: skip
    """``sum_n g_n^2`` ``[F]`` float64 per stream over prefix tokens ``[keep_from, prefix)`` of one sequence, and
    their count; the prefix's K/V are the first ``prefix`` tokens of ``cache`` (not modified)."""
    from transformers import DynamicCache  # noqa: PLC0415  (heavy import)

    _check(ids.numel(), prefix, keep_from)
    layers = cache.layers
    if len(layers) != spec.num_layers or layers[0].keys.shape[2] < prefix:
        raise ValueError(
            f"cache must hold {spec.num_layers} layers of >= {prefix} tokens, got {len(layers)} layers of "
            f"{layers[0].keys.shape[2] if layers else 0}"
        )
    leaves = [(x.keys[:, :, :prefix].clone().requires_grad_(), x.values[:, :, :prefix].clone().requires_grad_())
              for x in layers]  # L x ([1, H, P, D], [1, H, P, D])  # fmt: skip
    run = DynamicCache()
    for i, (k, v) in enumerate(leaves):
        run.update(k, v, i)
    with torch.enable_grad():
        logits = model(ids[None, prefix:], past_key_values=run, use_cache=True).logits[0].float()  # [C, V]
        logp = torch.log_softmax(logits, dim=-1)
        y = torch.multinomial(logp.detach().exp(), 1, generator=generator)  # [C, 1]
        grads = torch.autograd.grad(logp.gather(1, y).sum(), [t for kv in leaves for t in kv])
    gk = torch.stack([g[0] for g in grads[0::2]]).permute(0, 2, 1, 3).float()  # [L, H, P, D] -> [L, P, H, D]
    gv = torch.stack([g[0] for g in grads[1::2]]).permute(0, 2, 1, 3).float()
    gk = remove_rope(gk, torch.arange(prefix), spec.ropes)  # R(n)^T g: the RoPE-removed frame
    sums = {s: g[:, keep_from:].double().pow(2).sum(1).flatten() for s, g in (("k", gk), ("v", gv))}  # [F]
    return sums, prefix - keep_from
