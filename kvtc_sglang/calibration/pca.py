"""Streaming PCA over cross-layer token features.

Features of one token are all layers' and heads' values concatenated: ``F = L * H * D``. The
accumulator takes ``[T, F]`` batches, keeps the sum and the Gram matrix in float64, and returns the
mean ``[F]`` and the eigen-basis ``[F, F]`` (columns ordered by decreasing variance) in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codec.tp import PAD


@dataclass(frozen=True)
class PCAFit:
    """PCA of features normalised per block: ``coeffs = ((x - mean) / scale) @ basis``.

    ``mean`` and ``scale`` are ``[F]``, ``basis`` ``[F, R]`` (orthonormal columns), ``variance`` ``[R]``,
    all float32.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    basis: torch.Tensor
    variance: torch.Tensor
    num_tokens: int


class CovarianceAccumulator:
    """Running first and second moments of ``[T, F]`` feature batches."""

    def __init__(self, num_features: int) -> None:
        self.num_features = num_features
        self._sum = torch.zeros(num_features, dtype=torch.float64)
        self._gram = torch.zeros(num_features, num_features, dtype=torch.float32)
        self._shift: torch.Tensor | None = None  # first batch's mean, for numerical stability
        self.num_tokens = 0

    def update(self, x: torch.Tensor) -> None:
        """Add ``x [T, F]`` (any float dtype) to the statistics."""
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"features must be [T, {self.num_features}], got {tuple(x.shape)}")
        x = x.to(torch.float32).cpu()
        if self._shift is None:
            self._shift = x.mean(dim=0)
        xc = x - self._shift  # [T, F]
        self._sum += xc.sum(dim=0, dtype=torch.float64)
        self._gram.addmm_(xc.t(), xc)  # fp32 GEMM, accumulated across batches
        self.num_tokens += x.shape[0]

    def take(self, index: torch.Tensor) -> CovarianceAccumulator:
        """The statistics of features ``index [F']`` (int64 into this accumulator's ``F``; ``PAD``: a feature
        that is always zero), exactly as if only they had been accumulated."""
        out = CovarianceAccumulator(index.numel())
        if self._shift is None:
            return out
        dst = (index != PAD).nonzero()[:, 0]  # [F_real]
        src = index[dst]  # [F_real]
        out._sum[dst] = self._sum[src]
        out._gram[dst[:, None], dst[None, :]] = self._gram[src[:, None], src[None, :]]  # the rest stays 0
        out._shift = torch.zeros(index.numel())
        out._shift[dst] = self._shift[src]
        out.num_tokens = self.num_tokens
        return out

    def fit(self, block: int = 1, scale: torch.Tensor | None = None) -> PCAFit:
        """Eigen-decompose the covariance; raises if fewer than two tokens were seen.

        With ``block > 1``, every run of ``block`` consecutive features (one layer's head when
        ``block = D``) is first divided by its RMS deviation, so that low-norm layers are not drowned
        by high-norm ones in the PCA and in the bit allocation's error measure. A given ``scale [F]``
        (positive, e.g. from an attention-aware metric) is used instead of the RMS one.
        """
        if block <= 0 or self.num_features % block:
            raise ValueError(f"block must divide F={self.num_features}, got {block}")
        if self._shift is None or self.num_tokens < 2:
            raise RuntimeError(f"PCA needs at least 2 tokens, got {self.num_tokens}")
        n = self.num_tokens
        mean_c = self._sum / n  # [F] float64
        cov = self._gram.double() / n - torch.outer(mean_c, mean_c)  # [F, F]
        var = cov.diagonal().clamp(min=0.0).reshape(-1, block).mean(dim=1)  # [F / block]
        if scale is None:
            scale = var.sqrt().clamp(min=1e-6).repeat_interleave(block)  # [F]
        elif scale.shape != (self.num_features,) or not bool((scale > 0).all()):
            raise ValueError(f"scale must be positive [F={self.num_features}], got {tuple(scale.shape)}")
        scale = scale.double()
        cov = cov / torch.outer(scale, scale)
        evals, evecs = _eigh_live(cov.float())  # ascending
        order = torch.argsort(evals, descending=True)
        basis = evecs[:, order].contiguous()  # [F, F]
        # Fix each column's sign (largest entry positive) so fits are reproducible across runs.
        idx = basis.abs().argmax(dim=0)
        signs = torch.sign(basis[idx, torch.arange(basis.shape[1])])
        basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)[None, :]
        mean = (self._shift.double() + mean_c).float()
        return PCAFit(mean=mean, scale=scale.float(), basis=basis, variance=evals[order].clamp(min=0.0), num_tokens=n)


def _eigh_live(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of ``cov [F, F]`` (ascending), with features that never vary (an exactly zero
    diagonal: the zero heads SGLang pads in under tensor parallelism) kept out of the decomposition: a large
    block of zeros makes LAPACK's eigh fail to converge. They get eigenvalue 0 and their unit vectors."""
    live = cov.diagonal() > 0  # [F]
    if bool(live.all()):
        return torch.linalg.eigh(cov)
    f = cov.shape[0]
    idx, dead = live.nonzero()[:, 0], (~live).nonzero()[:, 0]  # [F_live], [F_dead]
    e_live, v_live = torch.linalg.eigh(cov[idx[:, None], idx[None, :]])  # [F_live], [F_live, F_live]
    evals = torch.cat([torch.zeros(dead.numel(), dtype=cov.dtype), e_live])  # [F] ascending (e_live >= ~0)
    evecs = torch.zeros(f, f, dtype=cov.dtype)
    evecs[dead, torch.arange(dead.numel())] = 1.0
    evecs[idx[:, None], torch.arange(dead.numel(), f)[None, :]] = v_live
    return evals, evecs
