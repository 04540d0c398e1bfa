"""Calibration text: the domains, their disjoint splits, and the config that picks them."""

from __future__ import annotations

import pytest

from kvtc_sglang.calibration.corpus import EVAL_ONLY_KINDS, KINDS, documents, token_sequences
from kvtc_sglang.calibration.fit import CalibrationConfig


@pytest.mark.parametrize("kind", KINDS)
def test_splits_are_disjoint_and_both_non_empty(kind):
    cal = {d.name for d in documents("calibration", kind)}
    ev = {d.name for d in documents("evaluation", kind)}
    assert cal and ev and not cal & ev
    assert all(d.kind == kind and d.text.strip() for d in documents("evaluation", kind))


def test_c_headers_are_deduplicated_and_spread_over_packages():
    docs = documents("calibration", "c")
    texts = [d.text for d in docs]
    assert len(set(texts)) == len(texts)  # vendored per-arch copies count once
    first = {d.name.split(":")[1].split("/")[0] for d in docs[:50]}
    assert len(first) >= 5, first  # CRC32 order, not alphabetical (which would start in one folder)


@pytest.mark.parametrize("bad", [(), ("perl",), ("prose", "prose"), ("markdown",)])
def test_calibration_domains_are_checked(bad):
    with pytest.raises(ValueError, match="domains must be distinct kinds"):
        CalibrationConfig(domains=bad)
    assert "perl" in EVAL_ONLY_KINDS


def test_token_sequences_respect_the_budget(lm):
    seqs, names = token_sequences(lm.tokenizer, "calibration", "c", 256, 1_000)
    assert len(seqs) == 4 and all(s.numel() == 256 for s in seqs) and names
    assert not set(names) & {d.name for d in documents("evaluation", "c")}


def test_too_few_tokens_for_a_held_out_sequence_is_refused():
    with pytest.raises(ValueError, match=r"at least holdout_every = 8 sequences of 1024 \(>= 8192 tokens\)"):
        CalibrationConfig(tokens=4096, seq_len=1024)
    assert CalibrationConfig(tokens=8192, seq_len=1024).holdout_every == 8
