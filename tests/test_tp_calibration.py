"""Per-rank calibration (issue 20): SGLang's head layouts, a rank's share of the statistics, per-rank artifacts
that the loader refuses for another rank, and codecs that round-trip each rank's pool rows."""

from __future__ import annotations

import pytest
import torch

from kvtc_sglang.calibration.pca import CovarianceAccumulator
from kvtc_sglang.codec.rope import RopeConfig
from kvtc_sglang.codec.spec import ModelSpec
from kvtc_sglang.codec.tp import PAD, feature_index, rank_kv_heads, rank_spec, split_heads, take_features


def _spec(heads: int = 3, layers: int = 2, d: int = 4) -> ModelSpec:
    return ModelSpec("m", "LlamaForCausalLM", layers, heads, d, "bfloat16", RopeConfig(theta=1e4, rotary_dim=d))


def test_rank_heads_follow_sglangs_cpu_padding_and_gpu_replication():
    # CPU engine: 3 KV heads at tp 2 are padded to 4 (SmolLM2), 2 at tp 2 split evenly (Qwen2.5)
    assert [rank_kv_heads(3, 2, r) for r in range(2)] == [(0, 1), (2, PAD)]
    assert [rank_kv_heads(2, 2, r) for r in range(2)] == [(0,), (1,)]
    assert [rank_kv_heads(2, 4, r) for r in range(4)] == [(0,), (1,), (PAD,), (PAD,)]
    assert rank_kv_heads(3, 1, 0) == (0, 1, 2)
    # GPU engine: even split, or replication when heads are fewer than ranks
    assert [rank_kv_heads(2, 4, r, "gpu") for r in range(4)] == [(0,), (0,), (1,), (1,)]
    assert rank_kv_heads(8, 4, 3, "gpu") == (6, 7)
    with pytest.raises(ValueError, match=r"KV heads \(3\) to divide by tp_size \(2\)"):
        rank_kv_heads(3, 2, 0, "gpu")
    with pytest.raises(ValueError, match="0 <= tp_rank < tp_size"):
        rank_kv_heads(3, 2, 2)


def test_a_ranks_features_are_its_pool_heads():
    spec = _spec()
    x = torch.randn(spec.num_layers, 5, spec.num_kv_heads, spec.head_dim)  # [L, T, H, D]
    for r in range(2):
        heads = rank_kv_heads(3, 2, r)
        pool = split_heads(x, heads)  # [L, T, H_r, D]
        flat = x.permute(1, 0, 2, 3).reshape(5, -1)  # [T, F]
        mine = take_features(flat, feature_index(spec, heads))  # [T, F_r]
        assert torch.equal(mine, pool.permute(1, 0, 2, 3).reshape(5, -1))
    assert torch.equal(split_heads(x, (2, PAD))[:, :, 1], torch.zeros(2, 5, 4))  # the zero head


def test_restricted_statistics_equal_the_ranks_own():
    spec = _spec()
    full = CovarianceAccumulator(spec.num_features)
    heads = rank_kv_heads(3, 2, 1)
    index = feature_index(spec, heads)
    own = CovarianceAccumulator(index.numel())
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(40, spec.num_features, generator=g) * 3 + 1  # [T, F]
        full.update(x)
        own.update(take_features(x, index))
    got = full.take(index)
    assert got.num_tokens == own.num_tokens
    a, b = got.fit(block=spec.head_dim), own.fit(block=spec.head_dim)
    torch.testing.assert_close(a.mean, b.mean)
    torch.testing.assert_close(a.variance, b.variance, atol=1e-4, rtol=1e-4)
    assert float(a.variance[index.numel() // 2 :].abs().max()) < 1e-5  # half the features are the zero head
    zero_head = index == PAD  # [F_r]
    assert float(a.basis[zero_head][:, : index.numel() // 2].abs().max()) == 0.0  # leading components skip it


def test_rank_spec_round_trips_and_names_a_mismatch():
    spec = _spec()
    r0, r1 = rank_spec(spec, 2, 0), rank_spec(spec, 2, 1)
    assert (r1.num_kv_heads, r1.tp_heads, r1.tp_rank, r1.tp_size) == (2, (2, PAD), 1, 2)
    assert ModelSpec.from_json(r1.to_json()) == r1
    assert not {"tp_rank", "tp_size", "tp_heads"} & set(spec.to_json())  # tp-1 headers (and their ids) unchanged
    problems = r1.mismatches(r0)
    assert any(p.startswith("tp_rank: calibration has 1, model has 0") for p in problems)
    assert any(p.startswith("tp_heads") for p in problems)
    assert any(p.startswith("tp_size: calibration has 1, model has 2") for p in spec.mismatches(r1))
    with pytest.raises(ValueError, match="tp_heads needs one entry per KV head"):
        ModelSpec("m", "LlamaForCausalLM", 2, 2, 4, "bfloat16", RopeConfig(theta=1e4, rotary_dim=4), tp_size=2)


@pytest.mark.model
def test_per_rank_artifacts_round_trip_each_ranks_rows_and_refuse_another_rank(lm, artifact_path, real_kv):
    """The rank artifacts the test calibration's fixture wrote with ``write_rank_artifacts`` (conftest: the same
    collect as the whole model's, 6k tokens)."""
    from conftest import GPU_BUNDLE

    from kvtc_sglang.codec import KVTCCodec, load_artifact
    from kvtc_sglang.codec.errors import ArtifactError
    from kvtc_sglang.codec.tp import rank_artifact_path

    if GPU_BUNDLE:
        pytest.skip("the GPU bundle's calibration has no rank artifacts")
    paths = [rank_artifact_path(artifact_path, 2, r) for r in (0, 1)]
    assert [p.name for p in paths] == [f"smollm2-135m-instruct.r16.tp2-rank{r}.kvtc.safetensors" for r in (0, 1)]
    specs = [rank_spec(lm.spec, 2, r) for r in (0, 1)]
    with pytest.raises(ArtifactError, match="tp_rank: calibration has 1, model has 0"):
        load_artifact(paths[1], expect=specs[0])
    with pytest.raises(ArtifactError, match="tp_size: calibration has 2, model has 1"):
        load_artifact(paths[0], expect=lm.spec)
    k, v, pos = real_kv
    codecs = [KVTCCodec(load_artifact(p, expect=s)) for p, s in zip(paths, specs, strict=True)]
    for r, (codec, spec) in enumerate(zip(codecs, specs, strict=True)):
        kr, vr = split_heads(k, spec.tp_heads), split_heads(v, spec.tp_heads)  # [L, T, H_r, D] bf16
        k2, v2, _ = codec.decode(codec.encode(kr[:, 4:500], vr[:, 4:500], pos[4:500]))
        for ref, got in ((kr[:, 4:500], k2), (vr[:, 4:500], v2)):
            err = float((got.float() - ref.float()).norm() / ref.float().norm())
            assert err < 0.5, (r, err)  # the whole model's codec at 16x is at ~0.2-0.4 (test_codec)
        if r == 1:  # the zero head SGLang pads in stays zero
            assert float(k2[:, :, 1].float().abs().max()) < 1e-2 and float(v2[:, :, 1].float().abs().max()) < 1e-2
    # the evaluation's per-rank method puts the model's 3 heads back from the two ranks
    from kvtc_sglang.eval.methods import tp_kvtc_method

    res = tp_kvtc_method(codecs)(k[:, 4:500], v[:, 4:500], pos[4:500])
    for ref, got in ((k[:, 4:500], res.k), (v[:, 4:500], res.v)):
        assert got.shape == ref.shape
        assert float((got.float() - ref.float()).norm() / ref.float().norm()) < 0.5
    # at least 8x the model's real K/V bits, though rank 1 spends its budget on a zero head too (16x of 4 heads)
    assert res.bits_after_entropy < res.bits_before_entropy < 2 * 496 * lm.spec.num_features * 16 / 8
    with pytest.raises(ValueError, match="one codec per rank in rank order"):
        tp_kvtc_method(codecs[::-1])
