"""Build a :class:`KVTCRadixCache` from SGLang's ``TreeCacheBuildContext`` (the registered backend factory)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ..codec import ArtifactError, KVTCCodec, load_artifact
from ..codec.spec import spec_from_config
from .config import ENV_VAR, KVTCCacheConfig, refused_server_option, refused_window
from .radix import KVTCRadixCache

logger = logging.getLogger(__name__)
BACKEND_NAME = "kvtc"


def config_from_env(environ: os._Environ | dict | None = None) -> KVTCCacheConfig:
    """The options the launcher put in ``KVTC_SGLANG_CONFIG``."""
    env = os.environ if environ is None else environ
    text = env.get(ENV_VAR)
    if not text:
        raise ValueError(
            f"--radix-cache-backend {BACKEND_NAME} needs a calibration: pass --kvtc-calibration PATH "
            f"(or set {ENV_VAR} when building the engine in-process)"
        )
    return KVTCCacheConfig.from_json(text)


def check_context(ctx: Any) -> None:
    """Refuse configurations KVTC cannot serve, naming the option to change."""
    refused = refused_server_option(lambda name: getattr(ctx, name, None))
    if refused:
        raise ValueError(f"kvtc: {refused}")
    refusals = [
        (ctx.is_hybrid_swa, "hybrid sliding-window attention models are not supported by kvtc"),
        (ctx.is_hybrid_ssm, "hybrid Mamba/SSM models are not supported by kvtc"),
        (getattr(ctx, "is_dsa", False), "DeepSeek sparse-attention (MLA) models are not supported by kvtc"),
    ]
    spec = getattr(getattr(ctx, "server_args", None), "speculative_algorithm", None)
    if spec not in (None, "", "NONE"):
        refusals.append(
            (True, f"speculative decoding ({spec}) is not supported: restores do not refill the draft model's KV")
        )
    for bad, message in refusals:
        if bad:
            raise ValueError(f"kvtc: {message}")


def build_kvtc_cache(ctx: Any) -> KVTCRadixCache:
    """Factory registered as ``--radix-cache-backend kvtc``; ``ctx`` is SGLang's ``TreeCacheBuildContext``."""
    check_context(ctx)
    config = config_from_env()
    server_args = getattr(ctx, "server_args", None)
    overlap = server_args is not None and not getattr(server_args, "disable_overlap_schedule", True)
    refused = refused_window(config.window_tokens, ctx.params.page_size, overlap)
    if refused:
        raise ValueError(f"kvtc: {refused}")
    allocator = ctx.params.token_to_kv_pool_allocator
    pool_dtype = str(allocator.get_kvcache().dtype).removeprefix("torch.")
    model_config = ctx.model_config
    hf = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    expect = spec_from_config(hf, name=str(getattr(model_config, "model_path", "model")), dtype=pool_dtype)
    path = Path(config.calibration)
    try:
        artifact = load_artifact(path, expect=expect)
    except ArtifactError as e:
        raise ValueError(f"kvtc: {e}") from e
    cache = KVTCRadixCache(ctx.params, KVTCCodec(artifact, chunk_bytes=config.chunk_bytes), config)
    logger.info(
        "kvtc: calibration %s (%.0fx target), compressed store up to %d slots (borrowed on demand), sinks %d, "
        "window %d",
        path.name,
        artifact.target_ratio,
        cache.store_max_tokens,
        config.sink_tokens,
        config.window_tokens,
    )
    return cache
