"""End-to-end evaluation on the real model: KVTC vs baselines, and the sink exemption's effect."""

from __future__ import annotations

import pytest

from kvtc_sglang.eval.harness import EvalConfig, evaluate
from kvtc_sglang.eval.methods import Result, kvtc_method, pca_truncation_method


def lossless(k, v, positions) -> Result:
    """The reference method: the K/V unchanged, so the metrics must read exact agreement."""
    del positions
    return Result(k.clone(), v.clone(), 16.0 * (k.numel() + v.numel()), None)


@pytest.fixture(scope="module")
def results(lm, codec):
    cfg = EvalConfig(context=512, continuation=64, segments_per_kind=1)
    methods = {
        "kvtc": (kvtc_method(codec), True),
        "kvtc-nosink": (kvtc_method(codec), False),
        "trunc": (pca_truncation_method(codec, 16.0), True),
        "lossless": (lossless, True),
    }
    return evaluate(lm, cfg, methods)


def test_report_fields_and_ratio(results):
    r = results["kvtc"]
    assert r["ratio_before_entropy"] >= 16.0 and r["ratio_after_entropy"] > r["ratio_before_entropy"]
    assert len(r["k_rel_err_per_layer"]) == 30 and len(r["v_rel_err_per_layer"]) == 30
    assert r["tokens_scored"] == 64 * 3  # one 64-token continuation per domain: prose, code, Perl
    assert {kind: d["tokens_scored"] for kind, d in r["domains"].items()} == {"prose": 64, "code": 64, "perl": 64}


def test_metrics_against_the_lossless_reference(results):
    """Unchanged K/V scores exactly (top-1 1, KL 0, errors 0); KVTC scores between it and truncation."""
    ref = results["lossless"]
    assert ref["top1_agreement"] == 1.0 and ref["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert max(ref["k_rel_err_per_layer"]) == 0.0 and max(ref["v_rel_err_per_layer"]) == 0.0
    kvtc, trunc = results["kvtc"], results["trunc"]
    assert ref["mean_kl"] < kvtc["mean_kl"] < trunc["mean_kl"]
    assert trunc["top1_agreement"] <= kvtc["top1_agreement"]


def test_kvtc_beats_truncation_at_equal_ratio(results):
    assert results["trunc"]["ratio_before_entropy"] == pytest.approx(16.0, rel=0.01)
    assert results["kvtc"]["mean_kl"] < results["trunc"]["mean_kl"]


def test_compressing_the_sinks_degrades_visibly(results):
    assert results["kvtc-nosink"]["mean_kl"] > 3 * results["kvtc"]["mean_kl"]
