"""Joint encoding probe, similarity side: how alike two contexts' KV of the same text are, and the source paper's
block fusion (Kampeas & Haleva, arXiv 2601.03067; code: sef1/kv_fast_fusion) written here in torch.

Pure torch on ``[L, T, H, D]`` K/V (keys as stored: RoPE applied); no model, no SGLang. The measurement script is
``benchmarks/joint_encoding.py``; the coding side (a reference plus a quantized residual) is :mod:`.residual`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codec.rope import RopeConfig, apply_rope, remove_rope


def span_cosines(a: torch.Tensor, b: torch.Tensor, span: int) -> torch.Tensor:
    """Cosine per layer between the same spans of two ``[L, T, H, D]`` tensors: ``[S, L]`` float32, ``S = T // span``.

    Span ``s`` is tokens ``[s * span, (s + 1) * span)`` of both; a partial last span is left out.
    """
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"need two [L, T, H, D] tensors of one shape, got {list(a.shape)} and {list(b.shape)}")
    if span < 1 or a.shape[1] < span:
        raise ValueError(f"span must be in [1, T = {a.shape[1]}], got {span}")
    num_l, num_t = a.shape[:2]
    num_s = num_t // span
    xa = a[:, : num_s * span].float().reshape(num_l, num_s, -1)  # [L, S, span*H*D]
    xb = b[:, : num_s * span].float().reshape(num_l, num_s, -1)
    return torch.nn.functional.cosine_similarity(xa, xb, dim=2).t().contiguous()  # [S, L]


def row_span_cosines(a: torch.Tensor, b: torch.Tensor, span: int) -> torch.Tensor:
    """Cosine between the same spans of two ``[T, R]`` coefficient tensors (all layers at once): ``[S]`` float32."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"need two [T, R] tensors of one shape, got {list(a.shape)} and {list(b.shape)}")
    num_s = a.shape[0] // span
    if span < 1 or num_s == 0:
        raise ValueError(f"span must be in [1, T = {a.shape[0]}], got {span}")
    xa = a[: num_s * span].float().reshape(num_s, -1)  # [S, span*R]
    xb = b[: num_s * span].float().reshape(num_s, -1)
    return torch.nn.functional.cosine_similarity(xa, xb, dim=1)


def rerotate(
    k: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, ropes: RopeConfig | list[RopeConfig]
) -> torch.Tensor:
    """Keys ``[L, T, H, D]`` rotated at positions ``src [T]`` -> the same keys at ``dst [T]`` (``k``'s dtype)."""
    return apply_rope(remove_rope(k, src, ropes), dst, ropes).to(k.dtype)


@dataclass(frozen=True)
class FusionRule:
    """The source paper's fusion: a block of ``block`` tokens of one request is replaced, in each group of
    ``group_layers`` layers, by the most similar page-aligned block of another request when the keys' cosine
    (RoPE applied, as stored) reaches ``threshold``; values follow the keys; the first and last ``edge_layers``
    layers never fuse. The paper projects each block to 512 random dimensions before the cosine; here the cosine
    is exact."""

    threshold: float = 0.75
    block: int = 16
    group_layers: int = 4
    edge_layers: int = 2

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine in [-1, 1], got {self.threshold}")
        if min(self.block, self.group_layers) < 1 or self.edge_layers < 0:
            raise ValueError(f"block and group_layers must be >= 1, edge_layers >= 0; got {self}")

    def layer_groups(self, num_layers: int) -> list[tuple[int, int]]:
        """``[lo, hi)`` layer ranges that may fuse: groups of ``group_layers`` between the protected edges."""
        lo, hi = self.edge_layers, num_layers - self.edge_layers
        return [(g, min(g + self.group_layers, hi)) for g in range(lo, hi, self.group_layers)]


def _blocks(k: torch.Tensor, starts: list[int], block: int, lo: int, hi: int) -> torch.Tensor:
    """Unit-norm keys of layers ``[lo, hi)`` of the blocks starting at ``starts``: ``[B, (hi-lo)*block*H*D]``."""
    x = torch.stack([k[lo:hi, s : s + block].float().reshape(-1) for s in starts])
    return torch.nn.functional.normalize(x, dim=1)


def best_block_cosines(
    k: torch.Tensor, k_ref: torch.Tensor, starts: list[int], rule: FusionRule
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each reader block starting at ``starts`` (token indices of ``k [L, T, H, D]``) and each fusable layer
    group: the best cosine over every page-aligned block of ``k_ref [L, T', H, D]`` and that block's start.
    Returns ``([B, G] float32, [B, G] int64)``."""
    ref_starts = list(range(0, k_ref.shape[1] - rule.block + 1, rule.block))
    groups = rule.layer_groups(k.shape[0])
    if not starts or not ref_starts or not groups:
        raise ValueError(f"nothing to compare: {len(starts)} blocks, {len(ref_starts)} reference blocks, {groups}")
    best = torch.empty(len(starts), len(groups))
    where = torch.empty(len(starts), len(groups), dtype=torch.int64)
    for g, (lo, hi) in enumerate(groups):
        sim = _blocks(k, starts, rule.block, lo, hi) @ _blocks(k_ref, ref_starts, rule.block, lo, hi).t()  # [B, B']
        val, idx = sim.max(dim=1)
        best[:, g] = val
        where[:, g] = torch.tensor(ref_starts)[idx]
    return best, where


def fuse_blocks(
    k: torch.Tensor, v: torch.Tensor, k_ref: torch.Tensor, v_ref: torch.Tensor, *, region: tuple[int, int],
    rule: FusionRule,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The paper's fusion of the reader's whole blocks inside ``region = [start, end)`` (block-aligned from token 0,
    as a paged pool holds them) against the reference context: ``(k', v', share of block-layers fused)``.

    ``k, v [L, T, H, D]`` are the reader's; ``k_ref, v_ref [L, T', H, D]`` the reference's, used as stored (their
    RoPE is at the reference's positions, as the paper's block-table redirection reads them).
    """
    start = -(-region[0] // rule.block) * rule.block
    starts = list(range(start, region[1] - rule.block + 1, rule.block))
    k2, v2 = k.clone(), v.clone()
    if not starts:
        return k2, v2, 0.0
    best, where = best_block_cosines(k, k_ref, starts, rule)
    groups = rule.layer_groups(k.shape[0])
    fused = 0
    for b, s in enumerate(starts):
        for g, (lo, hi) in enumerate(groups):
            if best[b, g] >= rule.threshold:
                r = int(where[b, g])
                k2[lo:hi, s : s + rule.block] = k_ref[lo:hi, r : r + rule.block]
                v2[lo:hi, s : s + rule.block] = v_ref[lo:hi, r : r + rule.block]
                fused += hi - lo
    return k2, v2, fused / (len(starts) * k.shape[0])


def share_at_least(values: torch.Tensor, thresholds: tuple[float, ...]) -> dict[str, float]:
    """Share of ``values`` (any shape) at or above each threshold: ``{"0.75": share, ...}``."""
    flat = values.float().reshape(-1)
    if flat.numel() == 0:
        raise ValueError("no values to count")
    return {f"{t:g}": float((flat >= t).float().mean()) for t in thresholds}
