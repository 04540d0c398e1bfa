"""Model specs from transformers configs: per-layer RoPE (Gemma 3), what the serving backend refuses."""

from __future__ import annotations

import pytest
from transformers import Gemma3TextConfig, LlamaConfig

from kvtc_sglang.codec.spec import ModelSpec, spec_from_config


def gemma3_config() -> Gemma3TextConfig:
    """Gemma 3 270M's attention geometry; GGUF-loaded configs carry no ``architectures``, only a model_type."""
    return Gemma3TextConfig(
        num_hidden_layers=18, num_key_value_heads=1, num_attention_heads=4, head_dim=256, hidden_size=640,
        sliding_window=512, rope_theta=1e6, rope_local_base_freq=1e4,
    )  # fmt: skip


def test_gemma3_gets_one_rope_per_layer_type():
    cfg = gemma3_config()
    spec = spec_from_config(cfg, "gemma3-270m", "bfloat16", serving=False)
    assert spec.architecture == "Gemma3ForCausalLM"
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (18, 1, 256)
    thetas = [r.theta for r in spec.layer_ropes]
    want = [1e6 if t == "full_attention" else 1e4 for t in cfg.layer_types]
    assert thetas == want and 1e6 in thetas and 1e4 in thetas
    assert spec.ropes == spec.layer_ropes
    assert ModelSpec.from_json(spec.to_json()) == spec


def test_serving_backend_refuses_gemma3():
    with pytest.raises(ValueError, match="Gemma3ForCausalLM is not supported by the kvtc serving backend"):
        spec_from_config(gemma3_config(), "gemma3-270m", "bfloat16")


def test_single_rope_spec_json_has_no_layer_ropes():
    """Existing artifacts hash their header: a single-RoPE spec must serialise exactly as before."""
    spec = spec_from_config(LlamaConfig(num_hidden_layers=2, rope_theta=1e5), "tiny", "bfloat16")
    assert spec.layer_ropes == () and spec.ropes == spec.rope
    assert "layer_ropes" not in spec.to_json()
    assert spec.rope.theta == 1e5


def test_unknown_model_type_is_named():
    cfg = LlamaConfig(num_hidden_layers=2)
    cfg.model_type = "mamba"
    with pytest.raises(ValueError, match="unknown \\(model_type 'mamba'\\) is not supported"):
        spec_from_config(cfg, "x", "bfloat16")


def test_gemma3_per_layer_rope_matches_transformers_rotary():
    """The spec's per-layer RoPE rotates keys exactly as Gemma 3's own rotary embedding does, per layer type."""
    import torch
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding, apply_rotary_pos_emb

    from kvtc_sglang.codec.rope import apply_rope

    cfg = gemma3_config()
    spec = spec_from_config(cfg, "gemma3-270m", "bfloat16", serving=False)
    rotary = Gemma3RotaryEmbedding(cfg)
    k = torch.randn(cfg.num_hidden_layers, 37, 1, 256, generator=torch.Generator().manual_seed(0))  # [L, T, H, D]
    positions = torch.arange(37) * 13
    ours = apply_rope(k, positions, spec.ropes)
    for layer, layer_type in enumerate(cfg.layer_types):
        x = k[layer : layer + 1].permute(0, 2, 1, 3)  # [1, H, T, D]
        cos, sin = rotary(x, positions[None, :], layer_type)
        _, ref = apply_rotary_pos_emb(x, x, cos, sin)
        atol = 2e-5 + 1e-7 * float(positions.max()) * float(k.abs().max())  # transformers' fp32 angles
        torch.testing.assert_close(ours[layer], ref[0].permute(1, 0, 2), atol=atol, rtol=1e-5)
