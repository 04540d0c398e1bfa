"""Entry point of SGLang's ``sglang.srt.plugins`` group.

SGLang's launcher calls :func:`register` in every process (launcher and schedulers) before it parses
arguments. It registers the ``kvtc`` radix-cache backend and hooks ``ServerArgs``:

- after ``ServerArgs.add_cli_args``: adds ``--kv-backend {kvtc}`` (it writes ``radix_cache_backend``) and
  the ``--kvtc-*`` options;
- before ``ServerArgs.from_cli_args``: validates them and hands them to the scheduler processes through the
  ``KVTC_SGLANG_CONFIG`` environment variable (``ServerArgs`` only carries its own fields);
- before ``Scheduler.get_next_batch_to_run``: calls ``KVTCRadixCache.scheduler_tick()`` once per scheduler
  loop iteration (both the normal and the overlap loop call it at the top of every iteration, after
  ``ingest_requests`` and outside the allocator's ``free_group_begin/end``; with ``--sleep-on-idle`` the idle
  loop still turns about once a second);
- before ``Scheduler.abort_request``: requests the L3 tier holds back for a prefetch go back to the waiting
  queue, where SGLang's abort finds and answers them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..cache.config import (
    ENV_VAR,
    KVTCCacheConfig,
    parse_bytes,
    refused_joint,
    refused_server_option,
    refused_tp,
    refused_window,
)
from ..codec import ArtifactError, read_header

BACKEND = "kvtc"


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes"):
        return True
    if value.lower() in ("0", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected 0 or 1, got {value!r}")


def _bytes(value: str) -> int:
    """A byte count >= 0 (``parse_bytes``: 4G, 512MiB, 1048576) for argparse."""
    try:
        return parse_bytes(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


TARGET_STEP = "sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run"
TARGET_ABORT = "sglang.srt.managers.scheduler.Scheduler.abort_request"
_OPTIONS = (  # (flag, dest, type, config field, help)
    ("--kvtc-calibration", "kvtc_calibration", str, "calibration", "Calibration artifact (*.kvtc.safetensors)."),
    ("--kvtc-sink-tokens", "kvtc_sink_tokens", int, "sink_tokens", "Leading tokens never compressed (default 4)."),
    ("--kvtc-window-tokens", "kvtc_window_tokens", int, "window_tokens",
     "Most recent tokens of each cached sequence never compressed (default 128)."),
    ("--kvtc-idle-seconds", "kvtc_idle_seconds", float, "idle_seconds",
     "The background encoder takes only radix nodes unused this long (default 0)."),
    ("--kvtc-idle-watermark", "kvtc_idle_watermark", float, "idle_watermark",
     "Start encoding cold nodes in the background once more than this share of the KV pool is used, or "
     "once SGLang had to evict (default 0.75)."),
    ("--kvtc-ready-fraction", "kvtc_ready_fraction", float, "ready_fraction",
     "The background encoder keeps this share of the KV pool free or instantly freeable (default 0.5)."),
    ("--kvtc-store-fraction", "kvtc_store_fraction", float, "store_fraction",
     "Most of the KV pool the compressed store may borrow; it grows into free slots and gives them back "
     "on demand (default 0.5)."),
    ("--kvtc-encode", "kvtc_encode", str, "encode",
     "Where encodes run: auto (background on a GPU, inline on the CPU; default), background (a worker thread "
     "or GPU side stream) or inline (on the scheduler thread)."),
    ("--kvtc-protect-wanted", "kvtc_protect_wanted", _flag, "protect_wanted",
     "0/1: blobs compressed or matched lately are not admission room, up to a bounded wait (default 1)."),
    ("--kvtc-max-waste-share", "kvtc_max_waste_share", float, "max_waste_share",
     "Pause encoding while more than this share of blobs is dropped before any restore (default 0.75; "
     "1 never pauses)."),
    ("--kvtc-dot-precision", "kvtc_dot_precision", str, "dot_precision",
     "The codec's projection precision: auto (bf16 on a CPU with native bf16 GEMMs, else exact fp32; "
     "default), ieee, bf16 (CPU), tf32x3 or tf32 (GPU)."),
    ("--kvtc-host-bytes", "kvtc_host_bytes", _bytes, "host_bytes",
     "Host-memory tier for compressed blobs that must leave the KV pool (e.g. 4G; default 0: none): they move "
     "to host memory instead of being dropped, and a match restores them from there."),
    ("--kvtc-codec", "kvtc_codec", str, "codec",
     "What the cache stores: kvtc (transform-coded blobs; default) or raw (raw KV bytes: the uncompressed "
     "baseline for benchmarks)."),
    ("--kvtc-l3", "kvtc_l3", str, "l3",
     "A store shared by replicas and restarts for whole-chunk blobs: directory or mooncake (default: none; "
     "needs --kvtc-host-bytes)."),
    ("--kvtc-l3-config", "kvtc_l3_config", str, "l3_config",
     "JSON for --kvtc-l3: the backend's keys ({\"path\": DIR} for a directory; SGLang's Mooncake keys such as "
     "{\"master_server_address\": \"HOST:PORT\"}) and kvtc's (chunk_tokens, prefetch_timeout_s, "
     "write_queue_depth, secret_file, min_chunks)."),
    ("--kvtc-joint-calibration", "kvtc_joint_calibration", str, "joint_calibration",
     "Joint encoding across requests (opt-in): text another radix branch holds is stored as a residual against "
     "one shared reference blob. The residual calibration (python -m kvtc_sglang.calibration.residual); its "
     "reference calibration must sit in the same folder."),
    ("--kvtc-joint-min-tokens", "kvtc_joint_min_tokens", int, "joint_min_tokens",
     "Shortest repeated span coded as a residual (default 128)."),
    ("--kvtc-verify-restores", "kvtc_verify_restores", _flag, "verify_restores",
     "Debugging (0/1): check every restored row against a re-encode of its rows made at commit (default 0)."),
)



def add_cli_args(_result: object, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
    """AFTER hook on ``ServerArgs.add_cli_args``."""
    if any("--kv-backend" in a.option_strings for a in parser._actions):
        return
    group = parser.add_argument_group("KVTC compressed radix cache (kvtc-sglang)")
    group.add_argument(
        "--kv-backend",
        dest="radix_cache_backend",
        choices=[BACKEND],
        default=argparse.SUPPRESS,
        help="KV-cache backend; 'kvtc' compresses cold radix-cache entries (same as --radix-cache-backend kvtc).",
    )
    for flag, dest, typ, _field, text in _OPTIONS:
        group.add_argument(flag, dest=dest, type=typ, default=None, help=text)


def config_from_namespace(ns: argparse.Namespace) -> KVTCCacheConfig | None:
    """The kvtc options of parsed arguments; ``None`` when kvtc is not the backend. Raises ``ValueError``."""
    given = {field: getattr(ns, dest) for _f, dest, _t, field, _h in _OPTIONS if getattr(ns, dest, None) is not None}
    if getattr(ns, "radix_cache_backend", None) != BACKEND:
        if given:
            flags = [f for f, dest, *_ in _OPTIONS if getattr(ns, dest, None) is not None]
            raise ValueError(f"{', '.join(flags)} given without --kv-backend {BACKEND}; add it or drop them")
        return None
    if "calibration" not in given:
        raise ValueError(
            f"--kv-backend {BACKEND} needs --kvtc-calibration PATH "
            "(make one with: python -m kvtc_sglang.calibration --out DIR)"
        )
    config = KVTCCacheConfig(**given)
    try:
        header = read_header(config.calibration)
    except ArtifactError as e:
        raise ValueError(f"--kvtc-calibration: {e}") from e
    refused = refused_server_option(lambda name: getattr(ns, name, None)) or refused_window(
        config.window_tokens, getattr(ns, "page_size", None), not getattr(ns, "disable_overlap_schedule", False)
    ) or refused_tp(config.idle_seconds, getattr(ns, "tp_size", None))
    refused = refused or refused_joint(config)
    if refused:
        raise ValueError(refused)
    _check_model(ns, header, config.calibration)
    if config.joint_calibration:
        from ..codec.joint import load_joint  # noqa: PLC0415 (opt-in)

        try:
            load_joint(config.joint_calibration)
        except (ArtifactError, OSError) as e:
            raise ValueError(f"--kvtc-joint-calibration: {e}") from e
    return config


def _check_model(ns: argparse.Namespace, header: dict, path: str) -> None:
    """Compare the calibration with the model's config when it is on local disk (else the backend
    factory checks it in the scheduler, where SGLang has loaded the config). At ``--tp-size N`` each rank's
    artifact (beside ``path``, :func:`~kvtc_sglang.codec.tp.rank_artifact_path`) is checked against the heads
    that rank's pool holds."""
    from ..codec.tp import rank_artifact_path, rank_spec

    tp = int(getattr(ns, "tp_size", None) or 1)
    rank_paths = [rank_artifact_path(path, tp, rank) for rank in range(tp)] if tp > 1 else []
    for rank_path in rank_paths:
        if not rank_path.is_file():
            raise ValueError(
                f"--tp-size {tp} needs one calibration per rank beside {path}: {rank_path.name} is missing "
                f"(make them with: python -m kvtc_sglang.calibration --tp-sizes 1 {tp} ...)"
            )
    model_path = getattr(ns, "model_path", None)
    if not model_path or not Path(model_path, "config.json").is_file():
        return
    from transformers import AutoConfig

    from ..codec.spec import ModelSpec, spec_from_config

    hf = AutoConfig.from_pretrained(model_path)
    cal = ModelSpec.from_json(header["model"])
    model = spec_from_config(hf, name=str(model_path), dtype=_kv_dtype(ns, hf) or cal.dtype)
    checks = [(path, cal, model)]
    for rank, rank_path in enumerate(rank_paths):
        try:
            rank_cal = ModelSpec.from_json(read_header(rank_path)["model"])
        except ArtifactError as e:
            raise ValueError(f"--kvtc-calibration: {e}") from e
        checks.append((str(rank_path), rank_cal, rank_spec(model, tp, rank, "cpu")))
    for where, got, want in checks:
        problems = got.mismatches(want)
        if problems:
            raise ValueError(f"--kvtc-calibration {where} does not fit {model_path}: " + "; ".join(problems))


def before_from_cli_args(*args: object, **kwargs: object) -> None:
    """BEFORE hook on ``ServerArgs.from_cli_args(cls, namespace)``: validate, then export for schedulers."""
    ns = kwargs.get("args", args[-1] if args else None)
    if not isinstance(ns, argparse.Namespace):
        return
    try:
        config = config_from_namespace(ns)
    except ValueError as e:
        sys.exit(f"kvtc: error: {e}")
    if config is not None:
        os.environ[ENV_VAR] = config.to_json()


def before_get_next_batch_to_run(*args: object, **kwargs: object) -> None:
    """BEFORE hook on ``Scheduler.get_next_batch_to_run(self, ...)``: the kvtc cache's per-step work.

    On its first call it hands the cache SGLang's forward stream, as the scheduler hands it to HiCache's
    controller (``load_fence_stream``/``write_fence_stream``): the model runner's ``forward_stream`` under the
    overlap scheduler, else ``None`` (the forward then runs on the scheduler's own stream)."""
    from ..cache.radix import KVTCRadixCache

    scheduler = args[0] if args else None
    cache = getattr(scheduler, "tree_cache", None)
    if isinstance(cache, KVTCRadixCache):
        if not cache.stream_bound:
            cache.bind_forward_stream(forward_stream_of(scheduler))
        cache.scheduler_tick(getattr(scheduler, "waiting_queue", None))


def before_abort_request(*args: object, **kwargs: object) -> None:
    """BEFORE hook on ``Scheduler.abort_request(self, recv_req)``: the kvtc L3 tier's parked requests that the
    abort names return to ``waiting_queue`` first (SGLang aborts only what its queues hold)."""
    from ..cache.radix import KVTCRadixCache

    scheduler = args[0] if args else None
    recv = args[1] if len(args) > 1 else kwargs.get("recv_req")
    cache = getattr(scheduler, "tree_cache", None)
    if isinstance(cache, KVTCRadixCache) and cache.l3 is not None and recv is not None:
        cache.l3.unpark(str(getattr(recv, "rid", "") or ""), bool(getattr(recv, "abort_all", False)),
                        getattr(scheduler, "waiting_queue", None))  # fmt: skip


def forward_stream_of(scheduler: object) -> object | None:
    """The stream SGLang's forward runs on when it is not the scheduler's current one (overlap), else ``None``."""
    if not getattr(scheduler, "enable_overlap", False):
        return None
    worker = getattr(scheduler, "tp_worker", None)
    runner = getattr(worker, "model_runner", None)
    return getattr(runner, "forward_stream", None) or getattr(scheduler, "forward_stream", None)


def register() -> None:
    """Plugin entry point: register the backend factory and the argument hooks (idempotent)."""
    from sglang.srt.mem_cache.registry import get_radix_cache_factory, register_radix_cache_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from ..cache.factory import build_kvtc_cache

    if get_radix_cache_factory(BACKEND) is None:
        register_radix_cache_backend(BACKEND, build_kvtc_cache)
    hooks = HookRegistry._hooks
    target_add = "sglang.srt.server_args.ServerArgs.add_cli_args"
    target_from = "sglang.srt.server_args.ServerArgs.from_cli_args"
    if not any(h is add_cli_args for _t, h, _s in hooks.get(target_add, [])):
        HookRegistry.register(target_add, add_cli_args, HookType.AFTER)
        HookRegistry.register(target_from, before_from_cli_args, HookType.BEFORE)
        HookRegistry.register(TARGET_STEP, before_get_next_batch_to_run, HookType.BEFORE)
        HookRegistry.register(TARGET_ABORT, before_abort_request, HookType.BEFORE)


_DTYPE_NAMES = {"half": "float16", "float16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float": "float32", "float32": "float32"}


def _kv_dtype(ns: argparse.Namespace, hf: object) -> str | None:
    """The KV cache dtype SGLang will use, as SGLang resolves ``--kv-cache-dtype``/``--dtype`` ("auto":
    fp32 and fp16 checkpoints run in fp16, bf16 ones in bf16); ``None`` when it cannot be told here."""
    kv = getattr(ns, "kv_cache_dtype", None) or "auto"
    if kv != "auto":
        if kv not in _DTYPE_NAMES:
            raise ValueError(f"--kv-cache-dtype {kv}: kvtc compresses 16-bit KV caches (auto, bf16)")
        return _DTYPE_NAMES[kv]
    wanted = getattr(ns, "dtype", None) or "auto"
    if wanted != "auto":
        return _DTYPE_NAMES.get(wanted)
    stored = str(getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or "").removeprefix("torch.")
    return {"bfloat16": "bfloat16", "float16": "float16", "float32": "float16"}.get(stored)
