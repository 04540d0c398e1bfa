"""Attention-aware error metrics for calibration: what the model sees of a K or V error.

Keys. A key error ``dk`` at position ``n`` changes the logit of a query at position ``m >= n`` by
``rope(q, m) . rope(dk, n) = (R(m - n) q) . dk`` in the RoPE-removed frame the codec works in (``R(t)``
is the rotation RoPE applies at position ``t``). Its mean square over queries and relative positions is
``dk^T M dk`` with ``M = E_t[R(t) C R(t)^T]``, ``C = E[q q^T]`` ``[D, D]`` pooled over the query heads
of a KV head (GQA). Averaging over ``t`` mixes each rotary pair's 2x2 block of ``C`` (for pairs that
turn many times over the context it becomes isotropic, ``(C_ii + C_jj) / 2``); cross-pair terms
mostly average out. :func:`key_metric_diag` computes ``diag(M)`` exactly from ``C`` and the
distribution of ``t``; whitening by ``sqrt(diag(M))`` is a per-feature scale, which the artifact
already carries, so no codec change is needed. :func:`key_metric_full` is the exact ``M`` (reference).

Values. A value error ``dv`` of KV head ``h`` reaches the residual stream as ``W_o[:, g] dv`` for each
query head ``g`` of the group; :func:`value_metric_diag` is ``diag(sum_g W_o,g^T W_o,g)`` ``[L, H, D]``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from ..codec.rope import RopeConfig, apply_rope, inv_freq
from ..codec.spec import ModelSpec


def attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The ``self_attn`` module of every decoder layer (HF Llama / Gemma 3 layout)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise RuntimeError(f"{type(model).__name__} has no model.layers; cannot find its attention modules")
    return [layer.self_attn for layer in layers]


class QueryMoments:
    """Running ``sum q q^T`` of pre-RoPE queries per layer and KV head: ``[L, H, D, D]`` float64.

    Queries are read from each attention module's ``q_proj`` output (and its ``q_norm`` where the
    model has one, as Gemma 3 does) with forward hooks while the model runs; rows listed in ``keep``
    (token indices) are used.
    """

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.sum = torch.zeros(spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.head_dim, dtype=torch.float64)
        self.count = 0

    @contextmanager
    def hooks(self, model: torch.nn.Module, keep: slice):
        """Collect queries of rows ``keep`` while the model runs inside the ``with`` block."""
        attns = attention_layers(model)
        if len(attns) != self.spec.num_layers:
            raise RuntimeError(f"model has {len(attns)} attention layers, spec says {self.spec.num_layers}")
        handles = []
        counted = [False]

        def make(layer: int, attn: torch.nn.Module):
            def hook(_mod: torch.nn.Module, _inp: tuple, out: torch.Tensor) -> None:
                d, h = self.spec.head_dim, self.spec.num_kv_heads
                q = out[0, keep].float()  # [T, Hq * D]
                q = q.reshape(q.shape[0], -1, d)  # [T, Hq, D]
                norm = getattr(attn, "q_norm", None)
                if norm is not None:
                    q = norm(q.to(out.dtype)).float()
                g = q.shape[1] // h
                q = q.reshape(q.shape[0], h, g, d).permute(1, 0, 2, 3).reshape(h, -1, d)  # [H, T * G, D]
                self.sum[layer] += torch.bmm(q.transpose(1, 2), q).double()  # [H, D, D]
                if layer == 0 and not counted[0]:
                    self.count += q.shape[1]
                    counted[0] = True

            return hook

        for i, attn in enumerate(attns):
            handles.append(attn.get_submodule("q_proj").register_forward_hook(make(i, attn)))
        try:
            yield self
        finally:
            for hnd in handles:
                hnd.remove()
            counted[0] = False

    def second_moment(self) -> torch.Tensor:
        """``E[q q^T]`` per layer and KV head, pooled over its query heads: ``[L, H, D, D]`` float64."""
        if self.count == 0:
            raise RuntimeError("no queries were collected")
        return self.sum / self.count


def relative_position_weights(context: int) -> torch.Tensor:
    """``p(t)`` ``[context]`` float64: share of query-key distance ``t`` among a sequence's causal pairs."""
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context}")
    w = torch.arange(context, 0, -1, dtype=torch.float64)  # context - t pairs at distance t
    return w / w.sum()


def _pair_index(cfg: RopeConfig, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(a, b)`` ``[rotary_dim / 2]`` of each rotary pair's first and second dim."""
    half = cfg.rotary_dim // 2
    if cfg.style == "neox":
        a = torch.arange(half)
        return a, a + half
    a = torch.arange(0, cfg.rotary_dim, 2)
    return a, a + 1


def key_metric_diag(cq: torch.Tensor, ropes: list[RopeConfig], context: int) -> torch.Tensor:
    """``diag(E_t[R(t) C R(t)^T])`` ``[L, H, D]`` float64 for ``cq [L, H, D, D]`` and distances over ``context``.

    With ``R(t) q`` turning pair ``(a, b)`` by angle ``w t`` (``y_a = q_a cos - q_b sin``,
    ``y_b = q_b cos + q_a sin``): ``E[y_a^2] = C_aa E[cos^2] + C_bb E[sin^2] - 2 C_ab E[sin cos]`` and
    ``E[y_b^2] = C_bb E[cos^2] + C_aa E[sin^2] + 2 C_ab E[sin cos]``; dims past ``rotary_dim`` keep ``C_ii``.
    """
    num_l = cq.shape[0]
    if len(ropes) != num_l:
        raise ValueError(f"need one RoPE config per layer ({num_l}), got {len(ropes)}")
    p = relative_position_weights(context)  # [T]
    t = torch.arange(context, dtype=torch.float64)
    out = torch.diagonal(cq, dim1=-2, dim2=-1).clone()  # [L, H, D]
    for layer, cfg in enumerate(ropes):
        ang = t[:, None] * inv_freq(cfg)[None, :]  # [T, D/2]
        c2 = (p[:, None] * ang.cos().pow(2)).sum(0)  # [D/2]
        s2 = 1.0 - c2
        cs = (p[:, None] * ang.sin() * ang.cos()).sum(0)
        a, b = _pair_index(cfg, cq.shape[-1])
        caa, cbb, cab = cq[layer, :, a, a], cq[layer, :, b, b], cq[layer, :, a, b]  # [H, D/2] each
        out[layer, :, a] = caa * c2 + cbb * s2 - 2 * cab * cs
        out[layer, :, b] = cbb * c2 + caa * s2 + 2 * cab * cs
    return out


def key_metric_full(cq: torch.Tensor, rope: RopeConfig, context: int, stride: int = 1) -> torch.Tensor:
    """Exact ``E_t[R(t) C R(t)^T]`` ``[H, D, D]`` float64 of one layer's ``cq [H, D, D]`` (reference, slow).

    Distances ``t`` are taken every ``stride`` with weights ``p(t)`` renormalised.
    """
    d = cq.shape[-1]
    ts = torch.arange(0, context, stride)
    p = relative_position_weights(context)[ts]
    p = p / p.sum()
    eye = torch.eye(d, dtype=torch.float32)[None, None].expand(1, len(ts), d, d)  # [1, T, D (as H), D]
    rot = apply_rope(eye, ts, rope)[0].double().transpose(1, 2)  # [T, D, D]: column j = R(t) e_j
    return torch.einsum("t,tab,hbc,tdc->had", p, rot, cq, rot)


def value_metric_diag(model: torch.nn.Module, spec: ModelSpec) -> torch.Tensor:
    """``diag(sum_g W_o,g^T W_o,g)`` ``[L, H, D]`` float64 over the query heads ``g`` of each KV head."""
    rows = []
    for attn in attention_layers(model):
        w = attn.get_submodule("o_proj").get_parameter("weight").detach().double()  # [hidden, Hq * D]
        col = w.pow(2).sum(0).reshape(spec.num_kv_heads, -1, spec.head_dim)  # [H, G, D]
        rows.append(col.sum(1))  # [H, D]
    return torch.stack(rows)


def metric_scale(diag: torch.Tensor, floor: float = 1e-3, mean: float | None = None) -> torch.Tensor:
    """Per-feature scale ``[F]`` float32 ``1 / sqrt(diag)`` for ``diag [L, H, D]``, normalised to mean 1.

    Features with metric below ``floor`` times the mean are clamped there (their error is nearly
    invisible, but a zero would make the scale infinite). ``F`` is ordered ``(L, H, D)`` as the codec's.
    ``mean`` replaces ``diag``'s own mean as the normaliser (one normalisation for several streams).
    """
    if (diag < 0).any():
        raise ValueError("metric diagonal must be non-negative")
    m = diag.flatten()  # [F]
    ref = float(m.mean()) if mean is None else mean
    if not ref > 0:
        raise ValueError(f"metric normaliser must be positive, got {ref}")
    m = m / ref
    return m.clamp(min=floor).rsqrt().float()
