"""Calibration's faster paths compute what the straightforward ones did: the Fisher continuation on the
collect's own prefill, and the int group errors of the DP with shared min/max and chunked windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtc_sglang.calibration import bitalloc
from kvtc_sglang.codec.quant import dequantize_int, quantize_int


def _reference_int_errors(toks: torch.Tensor, size: int, bits: int) -> np.ndarray:
    """Every window through the codec's own quantizer, one at a time."""
    out = []
    for s in range(toks.shape[1] - size + 1):
        seg = toks[:, s : s + size]
        codes, lo, step = quantize_int(seg, bits)
        out.append(float((seg - dequantize_int(codes, lo, step)).double().pow(2).sum(1).mean()))
    return np.array(out)


@pytest.mark.parametrize("chunk", [1 << 22, 100])  # one chunk, and windows split over many chunks
def test_int_group_errors_equal_the_codec_quantizers(monkeypatch, chunk):
    monkeypatch.setattr(bitalloc, "_CHUNK_ELEMENTS", chunk)
    g = torch.Generator().manual_seed(0)
    toks = torch.randn(48, 40, generator=g) * torch.logspace(1, -2, 40)[None, :]
    toks[:, 7] = 0.25  # a constant component: step 0, codes 0
    for size in (1, 4, 16):
        got = bitalloc._int_group_errors(toks, size, (2, 4, 8))
        for bits in (2, 4, 8):
            np.testing.assert_allclose(got[bits], _reference_int_errors(toks, size, bits), rtol=1e-12, atol=0)


def test_measure_group_errors_keeps_the_kinds_and_their_order():
    g = torch.Generator().manual_seed(1)
    coeffs = torch.randn(64, 20, generator=g)
    errs = bitalloc.measure_group_errors(coeffs, coeffs.abs().amax(0) / 200, ("int2", "int4", "int8", "fp8"))
    assert list(errs)[:5] == [(1, "drop"), (1, "fp8"), (1, "int2"), (1, "int4"), (1, "int8")]  # DP tie order
    assert {k[0] for k in errs} == {1, 16}
    assert all(len(v) == 20 - k[0] + 1 for k, v in errs.items())
    ints = bitalloc.measure_group_errors(coeffs, coeffs.abs().amax(0) / 200, ("int4",))
    assert sorted({k[1] for k in ints}) == ["drop", "int4"]
    np.testing.assert_array_equal(ints[(16, "int4")], errs[(16, "int4")])


def test_fisher_on_the_calibration_prefill_equals_a_separate_prefix_pass(lm):
    """``update_from_cache`` on a longer prefill (as collect() passes it) gives the same sums, bit for bit,
    as ``update``'s own prefix forward, and refuses a cache shorter than the prefix."""
    from kvtc_sglang.calibration.corpus import token_sequences
    from kvtc_sglang.calibration.fisher import FisherMoments, sequence_scores
    from kvtc_sglang.calibration.model import prefill_kv

    n, cont, keep = 192, 32, 16
    (ids,), _ = token_sequences(lm.tokenizer, "calibration", "code", n, n)
    a, b = FisherMoments(lm.spec), FisherMoments(lm.spec)
    a.update(lm.model, ids, cont, keep, torch.Generator().manual_seed(0))
    _, _, cache = prefill_kv(lm.model, ids[: n - cont + 8], torch.bfloat16)  # 8 tokens past the prefix
    b.update_from_cache(lm.model, cache, ids, n - cont, keep_from=keep, generator=torch.Generator().manual_seed(0))
    assert a.count == b.count == n - cont - keep
    for s in ("k", "v"):
        assert torch.equal(a.sum[s], b.sum[s]), s
    _, _, short = prefill_kv(lm.model, ids[: n - cont - 1], torch.bfloat16)
    with pytest.raises(ValueError, match=f"cache must hold 30 layers of >= {n - cont} tokens, got 30 layers of"):
        sequence_scores(lm.model, lm.spec, short, ids, n - cont, keep_from=keep, generator=torch.Generator())
    with pytest.raises(ValueError, match="need 0 <= keep_from < prefix < T"):
        sequence_scores(lm.model, lm.spec, cache, ids, n, keep_from=keep, generator=torch.Generator())


def test_calibration_records_its_phases(artifact):
    seconds = artifact.info["seconds"]
    assert set(seconds) == {"collect", "forward", "fisher", "covariance", "pca", "group_errors", "dp"}
    assert all(v >= 0 for v in seconds.values())
    assert seconds["forward"] + seconds["fisher"] + seconds["covariance"] <= seconds["collect"]


def test_fisher_every_takes_every_nth_fit_sequence_only(lm):
    """``fisher_every=n``: the Fisher's backward pass runs on fit sequences 0, n, 2n, ... (held-out ones never);
    the PCA still sees every fit sequence."""
    from kvtc_sglang.calibration.fit import CalibrationConfig, collect

    base = {"tokens": 4096, "seq_len": 512, "holdout_every": 4, "fisher_continuation": 32}
    per_seq = 512 - 32 - 128  # prefix tokens past the skipped edge
    counts = {}
    for every in (1, 2, 4):
        col = collect(lm, CalibrationConfig(**base, fisher_every=every), show_progress=False)
        counts[every] = col.fisher.count
        assert col.acc["k"].num_tokens == 6 * (512 - 2 * 128)  # 8 sequences, 2 held out
    assert counts == {1: 6 * per_seq, 2: 3 * per_seq, 4: 2 * per_seq}
    with pytest.raises(ValueError, match="fisher_every must be an integer >= 1, got 0"):
        CalibrationConfig(**base, fisher_every=0)
