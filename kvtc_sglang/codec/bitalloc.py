"""Dynamic-programming bit allocation over ordered principal components.

Given held-out calibration coefficients ``[N, R]`` (mean removed, projected on the basis), we measure
the real squared reconstruction error of every candidate group (start, size, kind) with the codec's
own quantizers, then pick the split of ``[0, R)`` into consecutive groups that minimises the total
error under a per-token bit budget. Costs are exact bit counts (per-token overhead included); the DP
runs on a grid of 2-bit units, since every group cost is even.
"""

from __future__ import annotations

import numpy as np
import torch

from .allocation import GROUP_SIZES, INT_KINDS, KIND_BITS, Allocation, Group, group_bits
from .quant import dequantize_fp8, dequantize_int, quantize_fp8, quantize_int

_UNIT_BITS = 2
# Tokens used to measure a group's error: fewer for big groups, whose error averages over more values.
_ELEMENTS_PER_START = 16384


def measure_group_errors(coeffs: torch.Tensor, fp8_scale: torch.Tensor, kinds: tuple[str, ...]) -> dict:
    """Squared error per token of every candidate group, measured with the real quantizers.

    Args:
        coeffs: ``[N, R]`` float32 held-out coefficients.
        fp8_scale: ``[R]`` float32 per-component fp8 scale.
        kinds: coded kinds to consider (``drop`` is always included).

    Returns:
        ``{(size, kind): errors[R - size + 1] float64}``, the mean over tokens of the summed squared
        error when components ``[i, i + size)`` are coded as ``kind``.
    """
    n, r = coeffs.shape
    sq = coeffs.double().pow(2).mean(dim=0)  # [R]
    errs: dict[tuple[int, str], np.ndarray] = {}
    csum_drop = torch.cat([torch.zeros(1, dtype=torch.float64), sq.cumsum(0)])  # [R + 1]
    fp8_err = (coeffs - dequantize_fp8(quantize_fp8(coeffs, fp8_scale), fp8_scale)).double().pow(2).mean(0)
    csum_fp8 = torch.cat([torch.zeros(1, dtype=torch.float64), fp8_err.cumsum(0)])
    for size in GROUP_SIZES:
        if size > r:
            continue
        starts = r - size + 1
        errs[(size, "drop")] = (csum_drop[size:] - csum_drop[:starts]).numpy()
        if "fp8" in kinds:
            errs[(size, "fp8")] = (csum_fp8[size:] - csum_fp8[:starts]).numpy()
        toks = coeffs[: max(16, min(n, _ELEMENTS_PER_START // size))]  # [n_s, R]
        for kind in kinds:
            if kind in INT_KINDS:
                errs[(size, kind)] = _int_group_errors(toks, size, KIND_BITS[kind])
    return errs


def _int_group_errors(toks: torch.Tensor, size: int, bits: int) -> np.ndarray:
    """Mean per-token squared error of int quantization for every window of ``size`` components."""
    n, r = toks.shape
    starts = r - size + 1
    out = np.empty(starts, dtype=np.float64)
    block = max(1, (1 << 24) // (n * size))  # windows per batch, bounded memory
    for s0 in range(0, starts, block):
        s1 = min(starts, s0 + block)
        win = toks.unfold(1, size, 1)[:, s0:s1]  # [n, W, size]
        flat = win.reshape(-1, size)  # [n * W, size]
        codes, lo, step = quantize_int(flat, bits)
        err = (flat - dequantize_int(codes, lo, step)).double().pow(2).sum(1)  # [n * W]
        out[s0:s1] = err.reshape(n, s1 - s0).mean(0).numpy()
    return out


def allocate_bits(errors: dict, rank_limit: int, budget_bits: int) -> Allocation:
    """Minimum-error split of components into groups under ``budget_bits`` per token.

    Args:
        errors: output of :func:`measure_group_errors`.
        rank_limit: number of components ``R`` the errors cover.
        budget_bits: per-token bit budget (``16 * F / target_ratio``).
    """
    if budget_bits < 0:
        raise ValueError(f"budget_bits must be >= 0, got {budget_bits}")
    units = budget_bits // _UNIT_BITS
    trans = [(size, kind, group_bits(size, kind) // _UNIT_BITS) for (size, kind) in errors]
    inf = np.inf
    best = np.full((rank_limit + 1, units + 1), inf, dtype=np.float64)  # [pos, units used]
    choice = np.full((rank_limit + 1, units + 1), -1, dtype=np.int16)
    best[0, 0] = 0.0
    for pos in range(rank_limit):
        row = best[pos]
        if not np.isfinite(row).any():
            continue
        for t, (size, kind, cost) in enumerate(trans):
            end = pos + size
            if end > rank_limit or cost > units:
                continue
            cand = row[: units + 1 - cost] + errors[(size, kind)][pos]
            tgt = best[end, cost:]
            better = cand < tgt
            if better.any():
                tgt[better] = cand[better]
                choice[end, cost:][better] = t
    # A split may stop anywhere: the rest of the components is dropped at its full variance.
    tail = _tail_errors(errors, rank_limit)
    totals = best.min(axis=1) + tail  # [pos]
    end = int(np.argmin(totals))
    used = int(np.argmin(best[end]))
    groups: list[Group] = []
    pos = end
    while pos > 0:
        t = int(choice[pos, used])
        size, kind, cost = trans[t]
        groups.append(Group(pos - size, size, kind))
        pos -= size
        used -= cost
    groups.reverse()
    alloc = Allocation(tuple(groups))
    if alloc.bits_per_token > budget_bits:
        raise RuntimeError(f"allocation uses {alloc.bits_per_token} bits, budget {budget_bits}")
    return alloc


def _tail_errors(errors: dict, rank_limit: int) -> np.ndarray:
    """Error of dropping components ``[pos, R)`` for every ``pos``: ``[R + 1]``."""
    per = errors[(1, "drop")]  # [R] per-component variance
    return np.concatenate([np.cumsum(per[::-1])[::-1], [0.0]])
