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

from ..codec.allocation import GROUP_SIZES, INT_KINDS, KIND_BITS, Allocation, Group, group_bits
from ..codec.quant import dequantize_fp8, quantize_fp8
from ..payload_format import FP16_MAX

_UNIT_BITS = 2
# Tokens used to measure a group's error: fewer for big groups, whose error averages over more values.
_ELEMENTS_PER_START = 16384
_CHUNK_ELEMENTS = 1 << 22  # values per chunk of windows in _int_group_errors (16 MiB float32)


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
        ints = [kind for kind in kinds if kind in INT_KINDS]
        per_bits = _int_group_errors(toks, size, tuple(KIND_BITS[kind] for kind in ints))
        for kind in ints:
            errs[(size, kind)] = per_bits[KIND_BITS[kind]]
    return errs


def _int_group_errors(toks: torch.Tensor, size: int, bits: tuple[int, ...]) -> dict[int, np.ndarray]:
    """Mean per-token squared error of int quantization (each of ``bits``) for every window of ``size``
    components: ``{bits: errors[R - size + 1]}``.

    The same arithmetic as :func:`~kvtc_sglang.codec.quant.quantize_int` then ``dequantize_int``, with each
    window's min and max found once for all ``bits``, on windows of a few MiB at a time (cache-sized).
    """
    n, r = toks.shape
    starts = r - size + 1
    out = {b: np.empty(starts, dtype=np.float64) for b in bits}
    block = max(1, _CHUNK_ELEMENTS // (n * size))  # windows per chunk
    windows = toks.unfold(1, size, 1)  # [n, starts, size], a view
    for s0 in range(0, starts, block):
        s1 = min(starts, s0 + block)
        win = windows[:, s0:s1]  # [n, W, size]
        lo = win.amin(dim=2).clamp(-FP16_MAX, FP16_MAX).to(torch.float16).float()  # [n, W], fp16-rounded
        hi = win.amax(dim=2)
        shifted = win - lo[:, :, None]
        for b in bits:
            levels = (1 << b) - 1
            step = ((hi - lo) / levels).clamp(0.0, FP16_MAX).to(torch.float16).float()  # [n, W]
            coded = step > 0
            safe = torch.where(coded, step, torch.ones_like(step))
            q = torch.round(shifted / safe[:, :, None]).clamp_(0, levels)
            q = torch.where(coded[:, :, None], q, torch.zeros_like(q))
            err = (win - (lo[:, :, None] + q * step[:, :, None])).double().pow(2).sum(2)  # [n, W]
            out[b][s0:s1] = err.mean(0).numpy()
    return out


class _BudgetDP:
    """Minimum error for every (position, bits used) pair; answers any budget up to ``units``."""

    def __init__(self, errors: dict, rank_limit: int, units: int) -> None:
        self.trans = [(size, kind, group_bits(size, kind) // _UNIT_BITS) for (size, kind) in errors]
        best = np.full((rank_limit + 1, units + 1), np.inf, dtype=np.float64)  # [pos, units used]
        choice = np.full((rank_limit + 1, units + 1), -1, dtype=np.int16)
        best[0, 0] = 0.0
        for pos in range(rank_limit):
            row = best[pos]
            if not np.isfinite(row).any():
                continue
            for t, (size, kind, cost) in enumerate(self.trans):
                end = pos + size
                if end > rank_limit or cost > units:
                    continue
                cand = row[: units + 1 - cost] + errors[(size, kind)][pos]
                tgt = best[end, cost:]
                better = cand < tgt
                if better.any():
                    tgt[better] = cand[better]
                    choice[end, cost:][better] = t
        self.best, self.choice = best, choice
        # A split may stop anywhere: the remaining components are dropped at their full variance.
        self.tail = _tail_errors(errors, rank_limit)  # [R + 1]
        self.within = np.minimum.accumulate(best, axis=1)  # [pos, budget]: best using <= budget units

    def curve(self) -> np.ndarray:
        """Minimum total error for every budget ``0..units`` (in 2-bit units): ``[units + 1]``."""
        return (self.within + self.tail[:, None]).min(axis=0)

    def allocation(self, units: int) -> Allocation:
        end = int(np.argmin(self.within[:, units] + self.tail))
        used = int(np.argmin(self.best[end, : units + 1]))
        groups: list[Group] = []
        pos = end
        while pos > 0:
            size, kind, cost = self.trans[int(self.choice[pos, used])]
            groups.append(Group(pos - size, size, kind))
            pos -= size
            used -= cost
        return Allocation(tuple(reversed(groups)))


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
    alloc = _BudgetDP(errors, rank_limit, units).allocation(units)
    if alloc.bits_per_token > budget_bits:
        raise RuntimeError(f"allocation uses {alloc.bits_per_token} bits, budget {budget_bits}")
    return alloc


def allocate_bits_joint(errors: tuple[dict, dict], rank_limit: int, budget_bits: int) -> tuple[Allocation, Allocation]:
    """Split one ``budget_bits`` per token between two streams (K and V) and allocate each optimally.

    Both error tables must be in commensurate units (here: each layer-head normalised to unit RMS), so
    the sum of the two errors is what the split minimises.
    """
    if budget_bits < 0:
        raise ValueError(f"budget_bits must be >= 0, got {budget_bits}")
    units = budget_bits // _UNIT_BITS
    dps = [_BudgetDP(e, rank_limit, units) for e in errors]
    ca, cb = dps[0].curve(), dps[1].curve()  # [units + 1] each
    total = ca + cb[::-1]  # stream A gets u units, stream B gets units - u
    ua = int(np.argmin(total))
    allocs = (dps[0].allocation(ua), dps[1].allocation(units - ua))
    used = allocs[0].bits_per_token + allocs[1].bits_per_token
    if used > budget_bits:
        raise RuntimeError(f"joint allocation uses {used} bits, budget {budget_bits}")
    return allocs


def _tail_errors(errors: dict, rank_limit: int) -> np.ndarray:
    """Error of dropping components ``[pos, R)`` for every ``pos``: ``[R + 1]``."""
    per = errors[(1, "drop")]  # [R] per-component variance
    return np.concatenate([np.cumsum(per[::-1])[::-1], [0.0]])
