"""What the codec must know about a model's KV cache: its shape, dtype and rotary settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .rope import RopeConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")  # the serving backend
# The codec alone (calibration, evaluation) also takes models with per-layer RoPE and sliding-window layers;
# the serving backend refuses them (SGLang gives them a hybrid SWA pool).
CODEC_ARCHITECTURES = (*SUPPORTED_ARCHITECTURES, "Gemma3ForCausalLM")
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class ModelSpec:
    """KV-cache geometry of one model: ``L`` layers, ``H`` KV heads, ``D`` head dim, pool dtype, RoPE.

    ``layer_ropes`` (empty for most models) gives each layer its own RoPE when layers differ (Gemma 3:
    base 1e4 on sliding-window layers, 1e6 on global ones); ``rope`` is then the first layer's.

    Under tensor parallelism a spec describes one rank's pool: ``tp_rank`` of ``tp_size``, ``num_kv_heads``
    the heads that rank holds and ``tp_heads`` the model's KV head in each of them (``-1``: a zero head SGLang's
    CPU engine pads in; :mod:`kvtc_sglang.codec.tp`). At ``tp_size == 1`` ``tp_heads`` is empty.
    """

    name: str
    architecture: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    rope: RopeConfig
    layer_ropes: tuple[RopeConfig, ...] = ()
    tp_rank: int = 0
    tp_size: int = 1
    tp_heads: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.layer_ropes and len(self.layer_ropes) != self.num_layers:
            raise ValueError(f"layer_ropes needs {self.num_layers} entries, got {len(self.layer_ropes)}")
        if not (isinstance(self.tp_size, int) and self.tp_size >= 1 and 0 <= self.tp_rank < self.tp_size):
            raise ValueError(f"need tp_size >= 1 and 0 <= tp_rank < tp_size, got {self.tp_rank} of {self.tp_size}")
        if len(self.tp_heads) != (self.num_kv_heads if self.tp_size > 1 else 0):
            raise ValueError(f"tp_heads needs one entry per KV head at tp_size > 1 ({self.num_kv_heads}), "
                             f"none at tp_size 1; got {self.tp_heads!r} at tp_size {self.tp_size}")
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

    @property
    def ropes(self) -> RopeConfig | tuple[RopeConfig, ...]:
        """What :func:`~kvtc_sglang.codec.rope.remove_rope` takes: one config, or one per layer."""
        return self.layer_ropes or self.rope

    def to_json(self) -> dict:
        data = asdict(self)
        if not self.layer_ropes:
            del data["layer_ropes"]  # artifacts of single-RoPE models keep their original header
        if self.tp_size == 1:
            for key in ("tp_rank", "tp_size", "tp_heads"):  # so do tp-1 artifacts
                del data[key]
        else:
            data["tp_heads"] = list(self.tp_heads)
        return data

    @classmethod
    def from_json(cls, data: dict) -> ModelSpec:
        try:
            rope = RopeConfig(**data["rope"])
            layer_ropes = tuple(RopeConfig(**r) for r in data.get("layer_ropes", ()))
            fields = {k: data[k] for k in ("name", "architecture", "num_layers", "num_kv_heads", "head_dim", "dtype")}
            tp_rank, tp_size = int(data.get("tp_rank", 0)), int(data.get("tp_size", 1))
            tp_heads = tuple(int(h) for h in data.get("tp_heads", ()))
        except (KeyError, TypeError) as e:
            raise ValueError(f"model spec is missing or has a bad field: {e}") from e
        return cls(rope=rope, layer_ropes=layer_ropes, tp_rank=tp_rank, tp_size=tp_size, tp_heads=tp_heads, **fields)

    def mismatches(self, other: ModelSpec) -> list[str]:
        """Human-readable differences that make a calibration unusable for ``other``."""
        out = []
        for field in ("architecture", "num_layers", "num_kv_heads", "head_dim", "dtype", "rope", "layer_ropes",
                      "tp_size", "tp_rank", "tp_heads"):
            mine, theirs = getattr(self, field), getattr(other, field)
            if mine != theirs:
                out.append(f"{field}: calibration has {mine!r}, model has {theirs!r}")
        return out


_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _architecture(config: object) -> str:
    """The config's architecture, or the one its ``model_type`` implies (GGUF configs carry no architectures)."""
    archs = getattr(config, "architectures", None)
    if archs:
        return str(archs[0])
    model_type = getattr(config, "model_type", None)
    return _MODEL_TYPES.get(str(model_type), f"unknown (model_type {model_type!r})")


def _rope_from_params(params: dict, head_dim: int, default_theta: float) -> RopeConfig:
    theta = float(params.get("rope_theta", default_theta))
    rope_type = params.get("rope_type", "default")
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
    return RopeConfig(**kwargs)


def spec_from_config(config: Any, name: str, dtype: str, serving: bool = True) -> ModelSpec:
    """Build a :class:`ModelSpec` from a transformers config; refuses unsupported attention.

    ``serving=True`` (the SGLang backend) accepts :data:`SUPPORTED_ARCHITECTURES` without
    sliding-window layers; ``serving=False`` (calibration, evaluation) accepts :data:`CODEC_ARCHITECTURES`,
    including per-layer RoPE and sliding-window layers.
    """
    arch = _architecture(config)
    allowed = SUPPORTED_ARCHITECTURES if serving else CODEC_ARCHITECTURES
    if arch not in allowed:
        what = "the kvtc serving backend" if serving else "the KVTC codec"
        raise ValueError(f"architecture {arch} is not supported by {what}; supported: {allowed}")
    layer_types = list(getattr(config, "layer_types", None) or [])
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    sliding = (sliding and arch != "LlamaForCausalLM") or "sliding_attention" in layer_types
    if serving and sliding:
        raise ValueError(f"{arch} with sliding-window attention is not supported by the kvtc serving backend")
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    default_theta = float(getattr(config, "rope_theta", 10000.0) or 10000.0)
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    layer_ropes: tuple[RopeConfig, ...] = ()
    if layer_types and all(isinstance(params.get(t), dict) for t in set(layer_types)):  # RoPE per layer type
        by_type = {t: _rope_from_params(params[t], head_dim, default_theta) for t in set(layer_types)}
        layer_ropes = tuple(by_type[t] for t in layer_types)
        rope = layer_ropes[0]
        if len(set(layer_ropes)) == 1:
            layer_ropes = ()
    else:
        rope = _rope_from_params(params, head_dim, default_theta)
    return ModelSpec(
        name=name,
        architecture=arch,
        num_layers=int(config.num_hidden_layers),
        num_kv_heads=int(config.num_key_value_heads),
        head_dim=head_dim,
        dtype=dtype,
        rope=rope,
        layer_ropes=layer_ropes,
    )
