"""End to end with SmolLM2 on CPU: real K/V through SGLang's pool and KVTCRadixCache, generation continued
from restored pages and compared with an uncompressed prefill (reference: the same model, full prefix)."""

from __future__ import annotations

import pytest

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.eval.serving import ServingEvalConfig, serving_eval

SMALL = ServingEvalConfig(turns=3, turn_tokens=160, system_tokens=384, users=4, user_tokens=32, pool_tokens=4096)


@pytest.mark.parametrize("scenario", ["multi_turn", "shared_prompt"])
def test_generation_continues_from_restored_pages(lm, codec, scenario):
    cfg = KVTCCacheConfig(calibration="unused-in-tests")  # the real defaults: 4 sinks, 128-token window
    out = serving_eval(lm, codec, cfg, SMALL, scenario)
    assert out["restored_tokens"] > 100 and out["reused_tokens"] > out["restored_tokens"]
    assert out["ratio"] > 10
    # A 6k-token test calibration (BENCHMARKS.md has the full one); a wrong position or page would give KL > 1.
    assert out["mean_kl"] < 0.08 and out["top1_agreement"] > 0.85, out


def test_control_without_compression_is_exact(lm, codec):
    """Same flow with nothing compressible (huge window): restored == original, so KL is ~0."""
    cfg = KVTCCacheConfig(calibration="unused-in-tests", window_tokens=100_000)
    out = serving_eval(lm, codec, cfg, SMALL, "shared_prompt")
    assert out["compressed_tokens"] == 0 and out["reused_tokens"] > 0
    assert out["mean_kl"] < 2e-3 and out["top1_agreement"] > 0.97, out
