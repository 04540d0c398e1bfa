"""KL sensitivity of every cached K/V feature: the diagonal Fisher information (issue 13, lever 3).

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

        num_t = ids.numel()
        prefix = num_t - continuation
        if continuation < 1 or not 0 <= keep_from < prefix:
            raise ValueError(
                f"need 1 <= continuation and 0 <= keep_from < prefix; got T={num_t}, continuation={continuation}, "
                f"keep_from={keep_from}"
            )
        with torch.no_grad():
            out = model(ids[None, :prefix], past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
        round_cache(out.past_key_values, DTYPES[self.spec.dtype])  # what the KV pool holds
        layers = out.past_key_values.layers
        leaves = [(x.keys.detach().clone().requires_grad_(), x.values.detach().clone().requires_grad_())
                  for x in layers]  # L x ([1, H, P, D], [1, H, P, D])  # fmt: skip
        cache = DynamicCache()
        for i, (k, v) in enumerate(leaves):
            cache.update(k, v, i)
        with torch.enable_grad():
            logits = model(ids[None, prefix:], past_key_values=cache, use_cache=True).logits[0].float()  # [C, V]
            logp = torch.log_softmax(logits, dim=-1)
            y = torch.multinomial(logp.detach().exp(), 1, generator=generator)  # [C, 1]
            grads = torch.autograd.grad(logp.gather(1, y).sum(), [t for kv in leaves for t in kv])
        gk = torch.stack([g[0] for g in grads[0::2]]).permute(0, 2, 1, 3).float()  # [L, H, P, D] -> [L, P, H, D]
        gv = torch.stack([g[0] for g in grads[1::2]]).permute(0, 2, 1, 3).float()
        gk = remove_rope(gk, torch.arange(prefix), self.spec.ropes)  # R(n)^T g: the RoPE-removed frame
        for s, g in (("k", gk), ("v", gv)):
            kept = g[:, keep_from:]  # [L, T', H, D]
            self.sum[s] += kept.double().pow(2).sum(1).flatten()  # [L, H, D] -> [F]
        self.count += prefix - keep_from

    def diag(self, stream: str) -> torch.Tensor:
        """Mean squared score per prefix token, ``[L, H, D]`` float64, of stream ``"k"`` or ``"v"``."""
        if self.count == 0:
            raise RuntimeError("no Fisher statistics were collected (fisher_continuation is 0)")
        s = self.spec
        return (self.sum[stream] / self.count).reshape(s.num_layers, s.num_kv_heads, s.head_dim)
