"""Dynamic-programming bit allocation: optimal on small problems, within budget, better than truncation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kvtc_sglang.calibration.bitalloc import allocate_bits, measure_group_errors
from kvtc_sglang.codec.allocation import Allocation, Group, group_bits

KINDS = ("int2", "int4", "int8", "fp8")


def brute_force_ref(errors: dict, rank: int, budget: int) -> float:
    """Reference: best total error over every assignment of singleton kinds, tail dropped."""
    kinds = ("drop", *KINDS)
    best = float("inf")
    for combo in itertools.product(kinds, repeat=rank):
        bits = sum(group_bits(1, k) for k in combo)
        if bits <= budget:
            best = min(best, sum(errors[(1, k)][i] for i, k in enumerate(combo)))
    return best


@pytest.mark.parametrize("budget", [0, 8, 20, 40, 60, 100])
def test_dp_matches_brute_force_on_singletons(budget):
    gen = torch.Generator().manual_seed(budget)
    coeffs = torch.randn(512, 5, generator=gen) * torch.tensor([9.0, 5.0, 3.0, 1.0, 0.2])
    fp8_scale = coeffs.abs().amax(0) * 2 / 448
    errors = {key: val for key, val in measure_group_errors(coeffs, fp8_scale, KINDS).items() if key[0] == 1}
    alloc = allocate_bits(errors, 5, budget)
    assert alloc.bits_per_token <= budget
    total = sum(errors[(g.size, g.kind)][g.start] for g in alloc.groups)
    total += (
        sum(errors[(1, "drop")][alloc.groups[-1].start + alloc.groups[-1].size :])
        if alloc.groups
        else sum(errors[(1, "drop")])
    )
    assert total == pytest.approx(brute_force_ref(errors, 5, budget), rel=1e-9, abs=1e-12)


def heldout_error(coeffs: torch.Tensor, alloc: Allocation, fp8_scale: torch.Tensor) -> float:
    from kvtc_sglang.codec.quant import decode_coefficients, encode_coefficients

    n = coeffs.shape[0]
    rec = decode_coefficients(encode_coefficients(coeffs, alloc, fp8_scale), alloc, fp8_scale, n, alloc.rank)
    rec = torch.nn.functional.pad(rec, (0, coeffs.shape[1] - alloc.rank))
    return float((rec - coeffs).pow(2).sum(1).mean())


def test_dp_respects_budget_and_beats_truncation_on_real_heldout_kv(artifact, codec, lm):
    """On real held-out K/V (not seen by calibration) the DP beats plain truncation at equal bits."""
    from kvtc_sglang.calibration.corpus import token_sequences
    from kvtc_sglang.calibration.model import prefill_kv

    seqs, _ = token_sequences(lm.tokenizer, "evaluation", "code", 400, 400)
    k, v, _ = prefill_kv(lm.model, seqs[0], torch.bfloat16)
    ck, cv = codec.transform(k[:, 4:], v[:, 4:], torch.arange(4, 400))
    budget = round(16 * lm.spec.num_features / artifact.target_ratio)  # per stream; K+V share 2x (joint)
    assert artifact.keys.allocation.bits_per_token + artifact.values.allocation.bits_per_token <= 2 * budget
    for coeffs, stream in ((ck, artifact.keys), (cv, artifact.values)):
        bits = stream.allocation.bits_per_token
        assert bits > 0
        dp_err = heldout_error(coeffs, stream.allocation, stream.fp8_scale)
        # truncation at the same bits: leading components in 8-bit fp8, nothing else
        keep = min(coeffs.shape[1], bits // 8)
        trunc = Allocation(tuple(Group(i, 1, "fp8") for i in range(keep)))
        trunc_err = heldout_error(coeffs[:, :keep], trunc, stream.fp8_scale[:keep]) + float(
            coeffs[:, keep:].pow(2).sum(1).mean()
        )
        assert dp_err < 0.8 * trunc_err


def test_budget_is_monotone():
    import kvtc_sglang.calibration.bitalloc as ba

    gen = torch.Generator().manual_seed(1)
    coeffs = torch.randn(256, 300, generator=gen) * torch.logspace(1, -2, 300)
    errors = ba.measure_group_errors(coeffs, coeffs.abs().amax(0) / 200, KINDS)
    last = np.inf
    for budget in (64, 256, 1024, 4096):
        alloc = allocate_bits(errors, 300, budget)
        assert alloc.bits_per_token <= budget
        err = heldout_error(coeffs, alloc, coeffs.abs().amax(0) / 200)
        assert err < last
        last = err
    with pytest.raises(ValueError, match="budget_bits"):
        allocate_bits(errors, 300, -1)


def test_joint_budget_is_never_worse_than_an_even_split():
    """With one budget for K and V the DP may move bits to the stream that needs them most."""
    from kvtc_sglang.calibration.bitalloc import allocate_bits_joint

    gen = torch.Generator().manual_seed(3)
    # 16 tokens: every group size is measured on all tokens, so the DP objective is the exact error
    a = torch.randn(16, 200, generator=gen) * torch.logspace(1, -1, 200)
    b = torch.randn(16, 200, generator=gen) * torch.logspace(0.5, -0.5, 200)
    sa, sb = a.abs().amax(0) / 200, b.abs().amax(0) / 200
    ea, eb = measure_group_errors(a, sa, KINDS), measure_group_errors(b, sb, KINDS)
    for budget in (256, 1024, 2048):
        ja, jb = allocate_bits_joint((ea, eb), 200, 2 * budget)
        assert ja.bits_per_token + jb.bits_per_token <= 2 * budget
        joint = heldout_error(a, ja, sa) + heldout_error(b, jb, sb)
        split = heldout_error(a, allocate_bits(ea, 200, budget), sa) + heldout_error(
            b, allocate_bits(eb, 200, budget), sb
        )
        assert joint <= split * (1 + 1e-6)
