"""Build a :class:`KVTCRadixCache` from SGLang's ``TreeCacheBuildContext`` (the registered backend factory)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from typing import Any

import torch

from ..codec import ArtifactError, KVTCCodec, RawCodec, load_artifact
from ..codec.joint import load_joint
from ..codec.spec import spec_from_config
from ..codec.tp import rank_artifact_path, rank_spec
from ..tiers.keys import KeyScheme, scheme_digest
from ..tiers.l3 import backend_from_config
from ..tiers.l3_client import L3Client
from .config import (
    ENV_VAR,
    KVTCCacheConfig,
    refused_joint,
    refused_server_option,
    refused_tp,
    refused_window,
    resolve_dot_precision,
)
from .l3_tier import L3Tier, split_options
from .radix import KVTCRadixCache
from .ranks import LocalAgreement, RankAgreement

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


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 GEMMs natively (AVX512-BF16 or AMX tiles; oneDNN then beats fp32 ~4x)."""
    cpu = torch.cpu
    return bool(getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def check_context(ctx: Any) -> None:
    """Refuse configurations KVTC cannot serve, naming the option to change."""
    server_args = getattr(ctx, "server_args", None)
    refused = refused_server_option(lambda name: getattr(ctx, name, getattr(server_args, name, None)))
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
    tp_size, tp_rank = int(getattr(ctx, "tp_size", 1) or 1), int(getattr(ctx, "tp_rank", 0) or 0)
    refused = refused_window(config.window_tokens, ctx.params.page_size, overlap)
    refused = refused or refused_tp(config.idle_seconds, tp_size)
    if refused:
        raise ValueError(f"kvtc: {refused}")
    allocator = ctx.params.token_to_kv_pool_allocator
    pool = allocator.get_kvcache()
    pool_dtype = str(pool.dtype).removeprefix("torch.")
    model_config = ctx.model_config
    hf = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    expect = spec_from_config(hf, name=str(getattr(model_config, "model_path", "model")), dtype=pool_dtype)
    padded_from = getattr(hf, "original_total_num_kv_heads", None)  # SGLang's CPU TP padding keeps the real count
    if padded_from:
        expect = replace(expect, num_kv_heads=int(padded_from))
    layout = "cpu" if str(getattr(pool, "device", "cpu")).startswith("cpu") else "gpu"
    expect = rank_spec(expect, tp_size, tp_rank, layout)  # the heads this rank's pool holds (SGLang's layout)
    try:
        path = rank_artifact_path(config.calibration, tp_size, tp_rank)
        artifact = load_artifact(path, expect=expect)
    except (ArtifactError, ValueError) as e:
        raise ValueError(f"kvtc: {e}") from e
    agreement = agreement_for(ctx.params.tp_cache_group, tp_rank, tp_size)
    precision = resolve_dot_precision(config.dot_precision, layout, cpu_has_native_bf16())
    codec: KVTCCodec | RawCodec
    if config.codec == "raw":  # the uncompressed baseline: the artifact was only checked against the model
        codec = RawCodec(artifact.spec, chunk_bytes=config.chunk_bytes)
    else:
        codec = KVTCCodec(artifact, chunk_bytes=config.chunk_bytes, dot_precision=precision)
    cache = KVTCRadixCache(ctx.params, codec, config, agreement=agreement)
    refused = refused_joint(config)
    if refused:
        raise ValueError(f"kvtc: {refused}")
    if config.joint_calibration:
        try:
            residual = rank_artifact_path(config.joint_calibration, tp_size, tp_rank, ".safetensors")
            joint = load_joint(residual, expect=expect, chunk_bytes=config.chunk_bytes,
                               dot_precision=precision)
        except (ArtifactError, OSError, ValueError) as e:
            raise ValueError(f"kvtc: --kvtc-joint-calibration: {e}") from e
        cache.enable_joint(joint)
        logger.info("kvtc: joint encoding on, rank %d: residual calibration %s against %s", tp_rank, residual.name,
                    joint.residual.info.get("reference_file"))
    if config.l3:
        cache.l3 = build_l3(cache, config, artifact.spec, str(getattr(model_config, "model_path", "model")),
                            tp_size=tp_size, tp_rank=tp_rank)  # fmt: skip
    logger.info(
        "kvtc: rank %d of %d, calibration %s (%.0fx target), compressed store up to %d slots (borrowed on "
        "demand), sinks %d, window %d, %s projections, %s encodes, %s codec, host tier %d bytes",
        tp_rank,
        tp_size,
        path.name,
        artifact.target_ratio,
        cache.store_max_tokens,
        config.sink_tokens,
        config.window_tokens,
        precision,
        cache.encode_mode,
        config.codec,
        config.host_bytes,
    )
    return cache


def agreement_for(group: Any, tp_rank: int, tp_size: int) -> LocalAgreement:
    """The ranks' agreement: over a dedicated gloo group of ``group``'s ranks (SGLang's TP CPU group; made
    here, where every rank builds its cache at the same point of start-up), or none on one rank."""
    if tp_size == 1:
        return LocalAgreement()
    import torch.distributed as dist

    if group is None:
        raise ValueError(f"kvtc: tensor parallelism ({tp_size} ranks) without SGLang's TP process group")
    ranks = dist.get_process_group_ranks(group)
    if len(ranks) != tp_size:
        raise ValueError(f"kvtc: SGLang's TP process group has {len(ranks)} ranks, --tp-size is {tp_size}")
    return RankAgreement(dist.new_group(ranks, backend="gloo"), tp_rank, tp_size)


def build_l3(cache: KVTCRadixCache, config: KVTCCacheConfig, spec: Any, model_path: str, *, tp_size: int,
             tp_rank: int) -> L3Tier:  # fmt: skip
    """The L3 tier of ``config.l3``: its backend and client, keys named by the calibration, the model's
    directory name, the KV dtype, the codec and the tensor-parallel layout (replicas must serve the same model
    from a directory of the same name to share objects)."""
    options, extra = split_options(json.loads(config.l3_config))
    try:
        backend = backend_from_config(config.l3, extra)
    except (OSError, RuntimeError) as e:
        raise ValueError(f"kvtc: --kvtc-l3 {config.l3} could not start: {e}") from e
    client = L3Client(backend, write_queue_depth=options.write_queue_depth, timeout_s=options.prefetch_timeout_s)
    digest = scheme_digest(cache.codec.artifact_id, model=os.path.basename(model_path.rstrip("/")),
                           kv_dtype=spec.dtype, tp_size=tp_size, tp_rank=tp_rank, chunk_tokens=options.chunk_tokens,
                           codec=config.codec)  # fmt: skip
    tier = L3Tier(cache, client, KeyScheme(options.chunk_tokens, digest), options, RawCodec(spec))
    logger.info("kvtc: L3 %s (%s chunks of %d tokens, key digest %s%s)", config.l3, type(backend).__name__,
                options.chunk_tokens, digest, ", MAC on" if tier.secret else "")  # fmt: skip
    return tier
