"""The joint-encoding probe's parts (kvtc_sglang/eval/joint*.py, residual.py; benchmarks/joint_report.py's go
criterion): cosines against a loop, re-rotation against rotating at the new positions, the paper's fusion rule,
residual coding on the real model's KV of one text read after two histories, and continuation scoring."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from kvtc_sglang.codec.rope import RopeConfig, apply_rope
from kvtc_sglang.eval.joint import FusionRule, fuse_blocks, rerotate, row_span_cosines, share_at_least, span_cosines


def span_cosines_ref(a: torch.Tensor, b: torch.Tensor, span: int) -> torch.Tensor:
    """Reference: one cosine per (span, layer) by a plain loop."""
    num_l, num_t = a.shape[:2]
    out = torch.empty(num_t // span, num_l)
    for s in range(num_t // span):
        for layer in range(num_l):
            x = a[layer, s * span : (s + 1) * span].double().flatten()
            y = b[layer, s * span : (s + 1) * span].double().flatten()
            out[s, layer] = float(x @ y / (x.norm() * y.norm()))
    return out


@pytest.mark.parametrize(("num_t", "span"), [(1, 1), (97, 16), (97, 7), (1000, 64)])
def test_span_cosines_match_a_loop(num_t: int, span: int) -> None:
    g = torch.Generator().manual_seed(num_t + span)
    a = torch.randn(3, num_t, 2, 8, generator=g)
    b = a + 0.5 * torch.randn(3, num_t, 2, 8, generator=g)
    a, b = a.to(torch.bfloat16), b.to(torch.bfloat16)  # as a pool holds them
    got = span_cosines(a, b, span)
    want = span_cosines_ref(a, b, span)
    assert got.shape == (num_t // span, 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    rows = row_span_cosines(a[0].reshape(num_t, -1), b[0].reshape(num_t, -1), span)  # [T, H*D]
    torch.testing.assert_close(rows, want[:, 0], rtol=1e-5, atol=1e-5)


def test_bad_shapes_and_spans_are_refused() -> None:
    with pytest.raises(ValueError, match="one shape"):
        span_cosines(torch.zeros(2, 8, 1, 4), torch.zeros(2, 9, 1, 4), 4)
    with pytest.raises(ValueError, match="span must be"):
        span_cosines(torch.zeros(2, 8, 1, 4), torch.zeros(2, 8, 1, 4), 9)
    with pytest.raises(ValueError, match="threshold"):
        FusionRule(threshold=1.5)
    assert share_at_least(torch.tensor([0.5, 0.8, 0.95, 1.0]), (0.75, 0.99)) == {"0.75": 0.75, "0.99": 0.25}


def test_rerotate_equals_rotating_at_the_new_positions() -> None:
    rope = RopeConfig(theta=10000.0, rotary_dim=8)
    pre = torch.randn(2, 97, 3, 8, generator=torch.Generator().manual_seed(1))  # [L, T, H, D] without RoPE
    src, dst = torch.arange(300, 397), torch.arange(97)
    moved = rerotate(apply_rope(pre, src, rope), src, dst, rope)
    torch.testing.assert_close(moved, apply_rope(pre, dst, rope), rtol=1e-5, atol=1e-5)


def test_fusion_replaces_similar_blocks_between_the_protected_layers_only() -> None:
    rule = FusionRule(threshold=0.9, block=4, group_layers=2, edge_layers=2)  # 8 layers: groups [2, 4), [4, 6)
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(8, 16, 1, 4, generator=g), torch.randn(8, 16, 1, 4, generator=g)  # [L, T, H, D]
    k_ref = torch.cat([torch.randn(8, 8, 1, 4, generator=g), k + 0.01 * torch.randn(8, 16, 1, 4, generator=g)], 1)
    v_ref = torch.cat([torch.zeros(8, 8, 1, 4), v + 1.0], 1)
    k_ref[4:6, 8 + 12 : 8 + 16] *= -1  # the last block of layers 4-5 no longer matches anything
    k2, v2, share = fuse_blocks(k, v, k_ref, v_ref, region=(2, 16), rule=rule)  # blocks at 4, 8, 12
    assert torch.equal(k2[:, :4], k[:, :4])  # the block that starts before the region is not touched
    assert torch.equal(k2[:2], k[:2]) and torch.equal(k2[6:], k[6:]) and torch.equal(v2[6:], v[6:])
    assert torch.equal(k2[2:6, 4:12], k_ref[2:6, 12:20]) and torch.equal(v2[2:6, 4:12], v[2:6, 4:12] + 1.0)
    assert torch.equal(k2[4:6, 12:16], k[4:6, 12:16]) and torch.equal(k2[2:4, 12:16], k_ref[2:4, 20:24])
    assert share == pytest.approx((4 + 4 + 2) / (3 * 8))


@pytest.fixture(scope="module")
def two_readings(lm):
    """One held-out text's KV read alone (positions 0..) and after a 100-token history (positions 100..)."""
    from kvtc_sglang.calibration.corpus import token_sequences
    from kvtc_sglang.calibration.model import prefill_kv

    (text,), _ = token_sequences(lm.tokenizer, "evaluation", "prose", 600, 600)
    (history,), _ = token_sequences(lm.tokenizer, "evaluation", "code", 100, 100)
    k, v, _ = prefill_kv(lm.model, text, torch.bfloat16)
    kq, vq, _ = prefill_kv(lm.model, torch.cat([history, text]), torch.bfloat16)
    return (k, v, torch.arange(600)), (kq[:, 100:], vq[:, 100:], torch.arange(100, 700))


def test_a_residual_against_another_reading_costs_bits_where_the_readings_differ(codec, two_readings) -> None:
    from kvtc_sglang.codec import ZlibDeflate
    from kvtc_sglang.eval.residual import (
        ResidualFit,
        apply_residual,
        code_residual,
        features,
        kvtc_payload_bytes,
        residual_coefficients,
        unfeatures,
    )

    (k, v, pos), (kq, vq, pq) = two_readings
    x, xq = features(codec, k, v, pos), features(codec, kq, vq, pq)
    d = residual_coefficients(codec, x, xq)  # [T, 2, R]
    c = torch.cat(codec.transform(k, v, pos), dim=1)
    assert 0 < float(d.pow(2).sum()) < 0.1 * float(c.pow(2).sum())  # the two readings are near, not equal
    fit = ResidualFit.fit(d[:300])  # allocations fitted on the first half, used on the second
    bits = codec.artifact.keys.allocation.bits_per_token + codec.artifact.values.allocation.bits_per_token
    errors, sizes = [], []
    for div in (16, 4, 1):
        d2, nbytes = code_residual(d[300:], fit.code(bits // div // 2 * 2), ZlibDeflate())
        k2, v2 = unfeatures(codec, *apply_residual(codec, (xq[0][300:], xq[1][300:]), d2), pos[300:], k.dtype)
        errors.append(float((k2.float() - k[:, 300:].float()).norm() + (v2.float() - v[:, 300:].float()).norm()))
        sizes.append(nbytes)
    moved = rerotate(kq[:, 300:], pq[300:], pos[300:], codec.spec.ropes)  # the reference alone, no residual
    alone = float((moved.float() - k[:, 300:].float()).norm() + (vq[:, 300:].float() - v[:, 300:].float()).norm())
    assert alone > errors[0] > errors[1] > errors[2] and sizes[0] < sizes[1] < sizes[2]
    same = apply_residual(codec, xq, residual_coefficients(codec, xq, xq))  # the exact copy: nothing to code
    assert torch.equal(same[0], xq[0]) and torch.equal(same[1], xq[1])
    blob = codec.encode(k, v, pos)
    assert kvtc_payload_bytes(codec, blob) + codec.read_header(blob).data_offset == blob.numel()  # all but the header


def test_scoring_puts_the_given_kv_into_the_cache(lm) -> None:
    from kvtc_sglang.eval.joint_sessions import Score, open_session, score, token_docs

    file = token_docs(lm, "evaluation", "code", 1, min_tokens=200)[0]
    s = open_session(lm, file[:20], file[20:], 120, 8)
    exact, zeroed = Score(), Score()
    region = (s.prefix + 10, s.context - 10)
    score(lm, s, s.k[:, region[0] : region[1]], s.v[:, region[0] : region[1]], region=region, tallies=[exact])
    v0 = torch.zeros_like(s.v[:, region[0] : region[1]])
    score(lm, s, s.k[:, region[0] : region[1]], v0, region=region, tallies=[zeroed], nbytes=7)
    assert exact.kl < 1e-6 and exact.top1 == 8 and exact.tokens == 8
    assert zeroed.kl > 100 * max(exact.kl, 1e-6) and zeroed.nbytes == 7 and zeroed.coded_tokens == 100


def test_the_go_criterion_takes_the_fewest_bytes_at_no_more_kl() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from joint_report import go

    rows = {
        "kvtc r16": {"mean_kl": 0.010, "bytes_per_token": 1200.0},
        "exact ref + residual, KVTC bits / 2": {"mean_kl": 0.004, "bytes_per_token": 600.0},
        "exact ref + residual, KVTC bits / 8": {"mean_kl": 0.011, "bytes_per_token": 150.0},
        "r16-coded ref + residual, KVTC bits / 2": {"mean_kl": 0.012, "bytes_per_token": 600.0},
    }
    out = go({"same": rows})
    assert out["same, exact reference"]["factor"] == pytest.approx(2.0) and out["same, exact reference"]["go"]
    assert out["same, r16-coded reference"]["factor"] is None and not out["same, r16-coded reference"]["go"]
