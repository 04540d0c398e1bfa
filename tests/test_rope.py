"""RoPE removal and re-application against the model's own rotary implementation."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from kvtc_sglang.codec.rope import RopeConfig, apply_rope, inv_freq, remove_rope


def rope_ref(k: torch.Tensor, positions: torch.Tensor, rotary_emb: torch.nn.Module) -> torch.Tensor:
    """Reference: transformers' Llama rotary embedding applied to ``k [L, T, H, D]``."""
    x = k.permute(0, 2, 1, 3)  # [L, H, T, D] as transformers lays it out
    cos, sin = rotary_emb(x, positions[None, :])  # [1, T, D]
    _, out = apply_rotary_pos_emb(x, x, cos, sin)
    return out.permute(0, 2, 1, 3)


@pytest.mark.parametrize("num_tokens", [1, 7, 97, 1000])
def test_apply_matches_model_rotary(lm, num_tokens):
    cfg = lm.spec.rope
    k = torch.randn(2, num_tokens, 3, 64, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(num_tokens) + 5
    ref = rope_ref(k, positions, lm.model.model.rotary_emb.float())
    # transformers computes the angles in float32 (error ~ position * 6e-8 rad); ours are float64.
    atol = 2e-5 + 1e-7 * float(positions.max()) * float(k.abs().max())
    torch.testing.assert_close(apply_rope(k, positions, cfg), ref, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("num_tokens", [1, 7, 97, 1000])
def test_remove_inverts_apply(style, num_tokens):
    cfg = RopeConfig(theta=1e5, rotary_dim=64, style=style)
    k = torch.randn(3, num_tokens, 2, 64, generator=torch.Generator().manual_seed(2))
    positions = torch.randint(0, 100_000, (num_tokens,), generator=torch.Generator().manual_seed(3))
    back = remove_rope(apply_rope(k, positions, cfg), positions, cfg)
    torch.testing.assert_close(back, k, atol=1e-5, rtol=1e-5)


def test_partial_rotary_dim_leaves_rest_untouched():
    cfg = RopeConfig(theta=1e4, rotary_dim=32)
    k = torch.randn(1, 9, 1, 64, generator=torch.Generator().manual_seed(4))
    out = apply_rope(k, torch.arange(9), cfg)
    assert torch.equal(out[..., 32:], k[..., 32:])
    assert not torch.allclose(out[:, 1:, :, :32], k[:, 1:, :, :32])


def test_llama3_scaling_matches_transformers():
    from transformers import LlamaConfig

    rope = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    hf_cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=rope)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    mine = inv_freq(
        RopeConfig(
            theta=5e5,
            rotary_dim=64,
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position=8192,
        )
    )
    torch.testing.assert_close(mine.float(), ref.float(), rtol=1e-6, atol=0)


def test_bad_config_and_shapes_are_refused():
    with pytest.raises(ValueError, match="rope_type"):
        RopeConfig(theta=1e4, rotary_dim=64, rope_type="yarn")
    with pytest.raises(ValueError, match="rotary_dim"):
        RopeConfig(theta=1e4, rotary_dim=63)
    cfg = RopeConfig(theta=1e4, rotary_dim=64)
    with pytest.raises(ValueError, match="positions must be"):
        apply_rope(torch.randn(1, 4, 1, 64), torch.arange(3), cfg)
    with pytest.raises(ValueError, match=r"\[L, T, H, D\]"):
        apply_rope(torch.randn(4, 1, 64), torch.arange(4), cfg)


def test_per_layer_rope_rotates_each_layer_with_its_own_base():
    """Gemma 3 style: sliding-window layers at base 1e4, global layers at 1e6, in one call."""
    local, glob = RopeConfig(theta=1e4, rotary_dim=64), RopeConfig(theta=1e6, rotary_dim=64)
    ropes = (local, local, glob, local, glob)
    k = torch.randn(5, 33, 1, 64, generator=torch.Generator().manual_seed(5))
    positions = torch.arange(33) * 7
    out = apply_rope(k, positions, ropes)
    for layer, cfg in enumerate(ropes):
        assert torch.equal(out[layer], apply_rope(k[layer : layer + 1], positions, cfg)[0])
    torch.testing.assert_close(remove_rope(out, positions, ropes), k, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"one RoPE config per layer \(5\), got 2"):
        apply_rope(k, positions, (local, glob))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("num_tokens", [1, 7, 97, 1000])
def test_tokens_first_layout_is_the_transpose(style, num_tokens, dtype):
    """``tokens_first=True`` writes ``[T, L, H, D]`` (the codec's feature layout) with the same values, bit for bit,
    for one config, per-layer configs and a partial rotary dim; inputs in the pool's dtype are rotated in fp32."""
    g = torch.Generator().manual_seed(6)
    k = torch.randn(4, num_tokens, 3, 64, generator=g).to(dtype)
    positions = torch.randint(0, 30_000, (num_tokens,), generator=g)
    one = RopeConfig(theta=1e5, rotary_dim=64, style=style)
    partial = RopeConfig(theta=1e4, rotary_dim=32, style=style)
    for cfg in (one, (one, partial, partial, one)):
        for fn in (apply_rope, remove_rope):
            ref = fn(k, positions, cfg)  # [L, T, H, D] float32
            out = fn(k, positions, cfg, tokens_first=True)
            assert out.dtype == torch.float32 and out.is_contiguous()
            assert torch.equal(out, ref.permute(1, 0, 2, 3))
    # the rotation itself, in fp32 from the bf16 input: the reference formula of transformers' rotate-half
    if style == "neox":
        ref = rope_ref(k.float(), positions, _Rotary(one))
        torch.testing.assert_close(apply_rope(k, positions, one), ref, atol=1e-5, rtol=1e-5)


class _Rotary(torch.nn.Module):
    """transformers-style ``(cos, sin) [1, T, D]`` of a :class:`RopeConfig` (float64 angles, as ours)."""

    def __init__(self, cfg: RopeConfig) -> None:
        super().__init__()
        self.freq = inv_freq(cfg)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.to(torch.float64)[..., None] * self.freq  # [1, T, D/2]
        emb = torch.cat([angles, angles], dim=-1)  # [1, T, D]
        return emb.cos().float(), emb.sin().float()
