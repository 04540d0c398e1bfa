"""What the codec must know about a model's KV cache: its shape, dtype and rotary settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .rope import RopeConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelSpec:
    """KV-cache geometry of one model: ``L`` layers, ``H`` KV heads, ``D`` head dim, pool dtype, RoPE."""

    name: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    rope: RopeConfig

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field} must be a positive int, got {value!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")

    @property
    def num_features(self) -> int:
        """``F = L * H * D``: one token's features across all layers and heads."""
        return self.num_layers * self.num_kv_heads * self.head_dim

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> ModelSpec:
        try:
            rope = RopeConfig(**data["rope"])
            fields = {k: data[k] for k in ("name", "architecture", "num_layers", "num_kv_heads", "head_dim", "dtype")}
        except (KeyError, TypeError) as e:
            raise ValueError(f"model spec is missing or has a bad field: {e}") from e
        return cls(rope=rope, **fields)

    def mismatches(self, other: ModelSpec) -> list[str]:
        """Human-readable differences that make a calibration unusable for ``other``."""
        out = []
        for field in ("architecture", "num_layers", "num_kv_heads", "head_dim", "dtype", "rope"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                out.append(f"{field}: calibration has {mine!r}, model has {theirs!r}")
        return out


def spec_from_config(config: object, name: str, dtype: str) -> ModelSpec:
    """Build a :class:`ModelSpec` from a transformers config; refuses unsupported attention."""
    arch = (getattr(config, "architectures", None) or ["LlamaForCausalLM"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"architecture {arch} is not supported; KVTC supports {SUPPORTED_ARCHITECTURES}")
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if sliding and arch != "LlamaForCausalLM":
        raise ValueError(f"{arch} with sliding-window attention is not supported")
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", "default")
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    kwargs: dict = {"theta": theta, "rotary_dim": head_dim, "style": "neox", "rope_type": rope_type}
    if rope_type == "llama3":
        kwargs.update(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    elif rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (default, llama3)")
    return ModelSpec(
        name=name,
        architecture=arch,
        num_layers=int(config.num_hidden_layers),
        num_kv_heads=int(config.num_key_value_heads),
        head_dim=head_dim,
        dtype=dtype,
        rope=RopeConfig(**kwargs),
    )
