"""Serving options of the KVTC radix cache (one frozen dataclass, validated on construction)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields

ENV_VAR = "KVTC_SGLANG_CONFIG"  # how the launcher hands these options to SGLang's scheduler processes


def refused_server_option(get: Callable[[str], object]) -> str | None:
    """Why kvtc cannot run with these SGLang settings, or ``None``. ``get(name)`` reads a setting by the name
    it has both in parsed CLI arguments and in ``TreeCacheBuildContext`` (launcher and factory share this)."""
    if get("disable_radix_cache"):
        return "--disable-radix-cache leaves nothing to compress; drop it"
    if get("enable_hierarchical_cache"):
        return "--enable-hierarchical-cache cannot be combined with kvtc; drop one"
    if get("hicache_storage_backend"):
        return (
            f"--hicache-storage-backend {get('hicache_storage_backend')} is HiCache's storage tier, which kvtc "
            "does not feed; drop it"
        )
    mode = get("disaggregation_mode")
    if mode not in (None, "", "null"):
        return (
            f"--disaggregation-mode {mode} is not supported by kvtc: a prefill server sends pages as the forward "
            "writes them, and kvtc never marks what SGLang's early-send check reads; run without P/D disaggregation"
        )
    if get("disaggregation_decode_retraction_backup") == "host_pool":
        return (
            "--disaggregation-decode-retraction-backup host_pool needs SGLang's HiCache host pool, which kvtc "
            "replaces; drop it"
        )
    tp = get("tp_size")
    if tp not in (None, 1) and get("device") != "cpu":
        return (
            f"kvtc at --tp-size {tp} is tested on SGLang's CPU engine only (--device cpu), not on GPUs yet; "
            "run with --tp-size 1"
        )
    if get("pp_size") not in (None, 1):
        return f"kvtc does not support pipeline parallelism (--pp-size {get('pp_size')}); run with --pp-size 1"
    if get("enable_dp_attention") or get("dp_size") not in (None, 1):
        return "kvtc does not support data parallelism (--dp-size, --enable-dp-attention): one tree per server"
    spec = get("speculative_algorithm")
    if spec not in (None, "", "NONE"):
        return (
            f"speculative decoding ({spec}) is not supported by kvtc: restores do not refill a draft model's "
            "KV pool; drop --speculative-algorithm"
        )
    return None


def refused_joint(config: KVTCCacheConfig) -> str | None:
    """Why joint encoding cannot run with these options, or ``None``."""
    if not config.joint_calibration:
        return None
    if config.codec != "kvtc":
        return (f"--kvtc-joint-calibration codes residuals of KVTC coefficients; it needs --kvtc-codec kvtc, not "
                f"{config.codec}")
    if not isinstance(config.joint_min_tokens, int) or config.joint_min_tokens < 32:
        return f"--kvtc-joint-min-tokens must be an integer >= 32, got {config.joint_min_tokens!r}"
    return None


def refused_window(window_tokens: int, page_size: int | None, overlap: bool) -> str | None:
    """Why a recent window is too small for the scheduler, or ``None``: under SGLang's overlap scheduler a
    forward may still write the last row of a request that already finished, so at least that row's page
    must stay exact."""
    ps = page_size or 1
    if overlap and window_tokens < ps:
        return (
            f"--kvtc-window-tokens {window_tokens} is below one page ({ps} tokens) with the overlap scheduler "
            f"on: use at least {ps}, or add --disable-overlap-schedule"
        )
    return None


def refused_tp(idle_seconds: float, tp_size: int | None) -> str | None:
    """Why these options cannot run at ``tp_size`` ranks, or ``None``: ranks must take every decision alike,
    and an idle time is each rank's own clock."""
    if tp_size not in (None, 1) and idle_seconds > 0:
        return (
            f"--kvtc-idle-seconds {idle_seconds:g} reads each rank's own clock, so tensor-parallel ranks would "
            f"compress different nodes; use 0 at --tp-size {tp_size}"
        )
    return None


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(value: str | int, minimum: int = 0) -> int:
    """A byte count: an integer with an optional K/M/G/T suffix (powers of 1024; ``96M``, ``96MiB``, ``1.5G``),
    at least ``minimum``; ``ValueError`` naming the value otherwise."""
    if isinstance(value, int):
        n = float(value)
    else:
        text = value.strip().upper().removesuffix("B").removesuffix("I")
        unit = text[-1:] if text[-1:] in _UNITS and text[-1:] else ""
        try:
            n = float(text[: len(text) - len(unit)]) * _UNITS[unit]
        except ValueError:
            raise ValueError(f"expected a byte count such as 96M or 1048576, got {value!r}") from None
    if not math.isfinite(n) or n < minimum:
        raise ValueError(f"expected a byte count >= {minimum}, got {value!r}")
    return int(n)


L3_BACKENDS = ("", "directory", "mooncake")  # the shared store (l3_tier.py): none, a local directory, Mooncake
CODECS = ("kvtc", "raw")  # what the cache stores: KVTC blobs, or raw KV bytes (the uncompressed baseline)
ENCODE_MODES = ("auto", "background", "inline")  # auto: resolve_encode_mode(pool device)


def resolve_encode_mode(mode: str, device_type: str) -> str:
    """Where encodes run for a pool on ``device_type``: ``auto`` is ``background`` on a GPU (a side stream beside
    the forward) and ``inline`` on the CPU, where SGLang's CPU engine runs the forward on every core, so an encode
    thread only competes with it (on this 2-core CPU, the main job's sessions: 56% of the big pool's TTFT gain
    inline against 46% with the worker, BENCHMARKS.md). Any other value is kept."""
    if mode != "auto":
        return mode
    return "background" if device_type == "cuda" else "inline"


DOT_PRECISIONS = ("auto", "ieee", "bf16", "tf32x3", "tf32")  # auto: resolve_dot_precision(pool device)


def resolve_dot_precision(precision: str, device_type: str, cpu_has_bf16: bool) -> str:
    """The codec's projection precision for a pool on ``device_type``: ``auto`` is ``bf16`` on a CPU with
    native bf16 GEMMs (AVX512-BF16 or AMX: ~4x faster, accuracy unchanged, BENCHMARKS.md), else ``ieee``
    (exact fp32; the Triton kernels' default on a GPU). Any other value is kept."""
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cpu" and cpu_has_bf16 else "ieee"


@dataclass(frozen=True)
class KVTCCacheConfig:
    """Options of :class:`~kvtc_sglang.cache.radix.KVTCRadixCache`.

    Attributes:
        calibration: path of the calibration artifact (``*.kvtc.safetensors``) for the served model.
        sink_tokens: leading tokens of every sequence that are never compressed (attention sinks).
        window_tokens: most recent tokens of every cached sequence (each leaf path) never compressed.
        idle_seconds: the background encoder takes only nodes untouched this long (``compress_idle``, the
            tool API, compresses nodes idle this long).
        idle_watermark: the background encoder wakes up when more than this share of the pool is in use, or
            when SGLang had to evict within the last ``PRESSURE_TICKS`` scheduler iterations; a workload that
            fits leaves it idle. ``evict`` frees encoded nodes first; it encodes (on the scheduler thread,
            bounded) only when the encoder fell behind and cold KV would be dropped otherwise.
        ready_fraction: once awake, the encoder keeps at least this share of the pool free or instantly
            freeable (free slots plus encoded nodes, locked ones included: they are freeable when their request
            ends), coldest nodes first.
        encode: ``background`` (a worker thread, on a GPU its side stream; the scheduler commits finished
            encodes at a later tick), ``inline`` (each encode runs when the tick queues it, on the scheduler
            thread) or ``auto`` (:func:`resolve_encode_mode`: background on a GPU, inline on the CPU).
        verify_restores: debugging: when an encode is committed, synchronize the device, re-encode the node's
            rows as it holds them and keep a host copy of what that decodes to; check every restored row against
            it (``verify_failures`` counts mismatches: an encode that read its rows too early, a restore written
            late, a row overwritten between encode and restore: stream races). Costs a second encode per blob, a
            device synchronize per commit and the raw KV size in host memory.
        store_fraction: most of the KV pool's token slots the compressed store may borrow. The store takes
            free slots page by page when a blob needs room and gives them back when its blobs are dropped,
            so nothing is reserved at start-up; its slots count as evictable for SGLang's admission (with
            ``protect_wanted``, all but those of wanted blobs).
        protect_wanted: the store slots of *wanted* blobs (compressed or matched lately,
            :mod:`~kvtc_sglang.cache.wanted`) are not admission room, so admitting a newcomer does not drop
            the blobs of sessions whose next turn is coming (on by default; a request kept out waits at most
            ``STARVE_TICKS`` scheduler passes, or until nothing runs).
        max_waste_share: encoding pauses (:mod:`~kvtc_sglang.cache.governor`) once four pools' worth of encoded
            tokens was dropped unused and such drops are more than this share of all blob outcomes (restored
            or dropped unused); 1.0 never pauses.
        min_tokens: smallest span worth compressing (a blob has a header of about 60 bytes).
        chunk_bytes: raw bytes per DEFLATE chunk inside a blob.
        dot_precision: the codec's projection precision (:class:`~kvtc_sglang.codec.KVTCCodec`): ``auto``
            (bf16 on a CPU with native bf16 GEMMs, else exact fp32), ``ieee``, ``bf16`` (the torch backend,
            CPU), ``tf32x3`` or ``tf32`` (the Triton kernels, GPU).
        host_bytes: the host tier's budget (:mod:`~kvtc_sglang.cache.placement`): a compressed node whose blob
            must leave the pool's store moves to host memory (pinned on a GPU) instead of being dropped, up to
            this many bytes (host memory's least recently used blobs then go with their nodes); 0: no host tier.
        codec: ``kvtc`` (transform coding, the product) or ``raw`` (:class:`~kvtc_sglang.codec.RawCodec`: the
            same cache storing raw KV bytes, ~1x; the uncompressed baseline of the tier benchmarks; the
            calibration is still checked against the model, not used).
        l3: the shared store of whole-chunk blobs (:mod:`~kvtc_sglang.cache.l3_tier`): ``directory`` or
            ``mooncake``; ``""``: none. Needs ``host_bytes`` (fetched blobs wait in host memory).
        l3_config: its JSON object: the backend's keys (``path``, ``max_bytes`` for a directory; SGLang's
            Mooncake keys ``master_server_address``, ``local_hostname``, ``protocol``, ...) and kvtc's
            (``chunk_tokens``, ``prefetch_timeout_s``, ``write_queue_depth``, ``secret_file``, ``min_chunks``).
        joint_calibration: joint encoding across requests (:mod:`~kvtc_sglang.cache.joint`): the residual
            calibration (``python -m kvtc_sglang.calibration.residual``); its reference calibration is the file
            its header names, in the same folder. ``""``: off.
        joint_min_tokens: the shortest span of text another branch holds that is coded as a residual.
    """

    calibration: str
    sink_tokens: int = 4
    window_tokens: int = 128
    idle_seconds: float = 0.0
    idle_watermark: float = 0.75
    ready_fraction: float = 0.5
    store_fraction: float = 0.5
    min_tokens: int = 16
    chunk_bytes: int = 1 << 16
    encode: str = "auto"
    verify_restores: bool = False
    protect_wanted: bool = True
    max_waste_share: float = 0.75
    dot_precision: str = "auto"
    host_bytes: int = 0
    codec: str = "kvtc"
    l3: str = ""
    l3_config: str = "{}"
    joint_calibration: str = ""
    joint_min_tokens: int = 128

    def __post_init__(self) -> None:
        refused = refused_joint(self)
        if refused:
            raise ValueError(refused)
        if self.l3 not in L3_BACKENDS:
            raise ValueError(f"l3 must be one of {L3_BACKENDS} ('' for none), got {self.l3!r}")
        try:
            extra = json.loads(self.l3_config)
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"l3_config must be a JSON object, got {self.l3_config!r}: {e}") from e
        if not isinstance(extra, dict):
            raise ValueError(f"l3_config must be a JSON object, got {self.l3_config!r}")
        if self.l3 and not self.host_bytes:
            raise ValueError("an L3 tier (--kvtc-l3) needs a host tier for the blobs it fetches: "
                             "give --kvtc-host-bytes")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if not isinstance(self.host_bytes, int) or isinstance(self.host_bytes, bool) or self.host_bytes < 0:
            raise ValueError(f"host_bytes must be an integer >= 0, got {self.host_bytes!r}")
        if not isinstance(self.protect_wanted, bool):
            raise ValueError(f"protect_wanted must be a bool, got {self.protect_wanted!r}")
        if not isinstance(self.verify_restores, bool):
            raise ValueError(f"verify_restores must be a bool, got {self.verify_restores!r}")
        if self.dot_precision not in DOT_PRECISIONS:
            raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {self.dot_precision!r}")
        if self.encode not in ENCODE_MODES:
            raise ValueError(f"encode must be one of {ENCODE_MODES}, got {self.encode!r}")
        if not isinstance(self.calibration, str) or not self.calibration:
            raise ValueError(f"calibration must be a non-empty path, got {self.calibration!r}")
        for name in ("sink_tokens", "window_tokens", "min_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if not isinstance(self.idle_seconds, (int, float)) or not math.isfinite(self.idle_seconds):
            raise ValueError(f"idle_seconds must be a finite number >= 0, got {self.idle_seconds!r}")
        if self.idle_seconds < 0:
            raise ValueError(f"idle_seconds must be >= 0, got {self.idle_seconds!r}")
        if self.min_tokens < 1:
            raise ValueError(f"min_tokens must be >= 1, got {self.min_tokens!r}")
        if not isinstance(self.store_fraction, (int, float)) or not 0.0 < self.store_fraction < 1.0:
            raise ValueError(f"store_fraction must be in (0, 1), got {self.store_fraction!r}")
        if not isinstance(self.idle_watermark, (int, float)) or not 0.0 <= self.idle_watermark < 1.0:
            raise ValueError(f"idle_watermark must be in [0, 1), got {self.idle_watermark!r}")
        if not isinstance(self.ready_fraction, (int, float)) or not 0.0 < self.ready_fraction <= 1.0:
            raise ValueError(f"ready_fraction must be in (0, 1], got {self.ready_fraction!r}")
        if not isinstance(self.max_waste_share, (int, float)) or not 0.0 < self.max_waste_share <= 1.0:
            raise ValueError(f"max_waste_share must be in (0, 1], got {self.max_waste_share!r}")
        if not isinstance(self.chunk_bytes, int) or self.chunk_bytes < 1024:
            raise ValueError(f"chunk_bytes must be an integer >= 1024, got {self.chunk_bytes!r}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> KVTCCacheConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{ENV_VAR} is not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ValueError(f"{ENV_VAR} must hold a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{ENV_VAR} has unknown keys {unknown}; known: {sorted(known)}")
        return cls(**data)
