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
    tp = get("tp_size")
    if tp not in (None, 1):
        return f"kvtc calibrations cover all KV heads; run with --tp-size 1 (got {tp})"
    spec = get("speculative_algorithm")
    if spec not in (None, "", "NONE"):
        return (
            f"speculative decoding ({spec}) is not supported by kvtc: restores do not refill a draft model's "
            "KV pool; drop --speculative-algorithm"
        )
    return None


@dataclass(frozen=True)
class KVTCCacheConfig:
    """Options of :class:`~kvtc_sglang.cache.radix.KVTCRadixCache`.

    Attributes:
        calibration: path of the calibration artifact (``*.kvtc.safetensors``) for the served model.
        sink_tokens: leading tokens of every sequence that are never compressed (attention sinks).
        window_tokens: most recent tokens of every cached sequence (each leaf path) never compressed.
        idle_seconds: an unlocked node untouched this long may be compressed by the per-step scheduler tick.
        idle_watermark: idle compression runs only while the pool's used share (``1 - free / size``) is
            above this, and stops once it is back below; pressure-driven compression (``evict``) always runs.
        store_fraction: most of the KV pool's token slots the compressed store may borrow. The store takes
            free slots page by page when a blob needs room and gives them back when its blobs are dropped,
            so nothing is reserved at start-up (its slots count as evictable for SGLang's admission).
        min_tokens: smallest span worth compressing (a blob has a header of about 60 bytes).
        chunk_bytes: raw bytes per DEFLATE chunk inside a blob.
    """

    calibration: str
    sink_tokens: int = 4
    window_tokens: int = 128
    idle_seconds: float = 30.0
    idle_watermark: float = 0.75
    store_fraction: float = 0.5
    min_tokens: int = 16
    chunk_bytes: int = 1 << 16

    def __post_init__(self) -> None:
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
