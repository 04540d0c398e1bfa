"""The backend's counters where SGLang users look: a log line and Prometheus metrics.

:class:`KVTCReporter` runs in the scheduler process; the cache calls :meth:`KVTCReporter.tick` once per
scheduler loop iteration (``KVTCRadixCache.scheduler_tick``, reached through the plugin's hook on
``Scheduler.get_next_batch_to_run``). It reads the counters as a flat dict (``KVTCStats.as_dict()``) and

- logs one line in SGLang's style (``KVTC cache. #compressed-token: ..., ratio: ..., ...``) when the
  counters changed, at most every ``min_interval`` seconds, and every ``interval`` seconds regardless;
- when SGLang runs with ``--enable-metrics`` (SGLang then sets ``PROMETHEUS_MULTIPROC_DIR`` before it
  starts the scheduler, the same signal its own collectors rely on), updates ``sglang:kvtc_*`` metrics in
  SGLang's Prometheus multiprocess registry, so they appear on the server's ``/metrics``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# (stats key, metric suffix, help); monotonic totals become Counters (``_total`` added by prometheus_client).
_COUNTERS = (
    ("compressions", "compressions", "Radix nodes compressed by kvtc."),
    ("compressed_tokens", "compressed_tokens", "Tokens compressed by kvtc (a token compressed twice counts twice)."),
    ("restores", "restores", "Compressed radix nodes restored into the KV pool."),
    ("restored_tokens", "restored_tokens", "Tokens restored into the KV pool."),
    ("restore_seconds", "restore_seconds", "Seconds spent restoring compressed nodes."),
    ("compress_seconds", "compress_seconds", "Seconds spent encoding nodes (background worker and inline)."),
    ("encoded_tokens", "encoded_tokens", "Tokens encoded into blobs by kvtc."),
    ("scheduler_codec_seconds", "scheduler_codec_seconds",
     "Seconds of kvtc codec work on the scheduler thread (restores, inline encodes)."),
    ("worker_seconds", "worker_seconds", "Seconds of kvtc encoding on its background worker."),
    ("encoder_waits", "encoder_waits", "Times the scheduler waited for kvtc's background encoder."),
    ("inline_encoded_tokens", "inline_encoded_tokens",
     "Tokens evict encoded on the scheduler thread because the background encoder had fallen behind."),
    ("dropped_unused_tokens", "dropped_unused_tokens", "Compressed tokens dropped before any reuse."),
    ("discarded_encoded_tokens", "discarded_encoded_tokens", "Encoded tokens whose kept blob was dropped unused."),
    ("restore_failures", "restore_failures", "Restores that failed for a reason other than a damaged blob."),
    ("verified_restores", "verified_restores", "Restored nodes checked against their reference (debugging)."),
    ("verify_failures", "verify_failures", "Restored rows that differ from their blob's reference (debugging)."),
    ("checksum_failures", "checksum_failures", "Compressed blobs that failed their checks (recomputed instead)."),
    ("dropped_tokens", "dropped_tokens", "Compressed tokens dropped for store space."),
    ("store_full_tokens", "store_full_tokens", "Encoded tokens whose blob the store could not take (encode wasted)."),
    ("encodes_deferred", "encodes_deferred", "Encodes of locked nodes deferred: the store could not take their blobs."),
    ("dropped_kept_tokens", "dropped_kept_tokens",
     "Tokens of kept blobs of device nodes dropped (a later compression encodes them again)."),
    ("starving_passes", "starving_passes",
     "Scheduler passes wanted blobs were admission room because a request had waited too long."),
    ("encode_pauses", "encode_pauses", "Times kvtc paused encoding because its blobs were dropped unused."),
    ("restore_no_memory", "restore_no_memory", "Restores given up for lack of free KV slots."),
    ("host_demotions", "host_demotions", "Compressed blobs moved from the KV pool's store to host memory."),
    ("host_demoted_bytes", "host_demoted_bytes", "Bytes of compressed blobs moved to host memory."),
    ("host_restores", "host_hits", "Compressed radix nodes restored from host memory."),
    ("host_restored_tokens", "host_hit_tokens", "Tokens restored from host memory."),
    ("host_dropped_tokens", "host_dropped_tokens", "Compressed tokens dropped from host memory for room."),
    ("host_full", "host_full", "Blobs that could not move to host memory (no room) and were dropped."),
    ("host_adopted", "host_adopted", "New blobs the KV pool's store could not take, kept in host memory instead."),
    ("host_seconds", "host_seconds", "Scheduler-thread seconds spent moving blobs to host memory."),
    ("joint_matches", "joint_matches", "Spans of encodes that matched text another branch holds (joint encoding)."),
    ("joint_references_made", "joint_references_made", "Shared reference blobs made (joint encoding)."),
    ("joint_references_fetched", "joint_references_fetched", "References fetched from the L3 for residuals."),
    ("joint_references_dropped", "joint_references_dropped", "Reference blobs freed with their last dependant."),
    ("joint_restored_tokens", "joint_restored_tokens", "Tokens restored from residual blobs (joint encoding)."),
    ("joint_discards", "joint_discards", "Residual encodes thrown away (reference gone, or no store room)."),
    ("l3_offered", "l3_offered", "Chunk objects offered to the L3 store (at commit; at a drop when written back)."),
    ("l3_references_written", "l3_references_written", "Joint encoding's reference objects queued for the L3."),
    ("l3_put_objects", "l3_put_objects", "Objects written to the L3 store."),
    ("l3_put_bytes", "l3_put_bytes", "Bytes written to the L3 store."),
    ("l3_put_dropped", "l3_put_dropped", "L3 writes dropped because the write queue was full."),
    ("l3_put_failed", "l3_put_failed", "L3 writes the store refused or failed."),
    ("l3_put_seconds", "l3_put_seconds", "Seconds the L3 writer spent in the store's put."),
    ("l3_parked", "l3_parked", "Requests held back while their chunks were looked up in L3."),
    ("l3_hits", "l3_hits", "Chunks grafted into the radix tree from L3."),
    ("l3_hit_tokens", "l3_hit_tokens", "Tokens grafted into the radix tree from L3."),
    ("l3_get_objects", "l3_get_objects", "Objects read from the L3 store."),
    ("l3_get_bytes", "l3_get_bytes", "Bytes read from the L3 store."),
    ("l3_get_seconds", "l3_get_seconds", "Seconds the L3 readers spent in the store."),
    ("l3_get_errors", "l3_get_errors", "L3 reads that failed (store down or erroring)."),
    ("l3_rejected", "l3_rejected", "L3 objects refused by a check (CRC, MAC, calibration, positions): misses."),
    ("l3_prefetch_timeouts", "l3_prefetch_timeouts", "L3 prefetches cut short by their deadline."),
)
# Current values become Gauges.
_GAUGES = (
    ("resident_tokens", "resident_tokens", "Tokens held compressed now."),
    ("resident_nodes", "resident_nodes", "Radix nodes held compressed now."),
    ("resident_blob_bytes", "resident_bytes", "Bytes of compressed KV held now."),
    ("resident_raw_bytes", "resident_raw_bytes", "Uncompressed size of the KV held compressed now."),
    ("ratio", "compression_ratio", "Achieved compression ratio of the resident compressed KV."),
    ("store_use", "store_usage", "Share of the compressed store in use (0..1)."),
    ("host_resident_tokens", "host_resident_tokens", "Tokens held compressed in host memory now."),
    ("host_resident_bytes", "host_resident_bytes", "Host-tier bytes in use now."),
    ("joint_references", "joint_references", "Shared reference blobs held now (joint encoding)."),
    ("joint_reference_tokens", "joint_reference_tokens", "Tokens the reference blobs hold now."),
    ("joint_reference_bytes", "joint_reference_bytes", "Bytes of reference blobs held now."),
    ("joint_residual_blobs", "joint_residual_blobs", "Blobs coded as residuals against a reference now."),
    ("joint_residual_tokens", "joint_residual_tokens", "Tokens held as residuals against a reference now."),
    ("joint_residual_bytes", "joint_residual_bytes", "Bytes of residual blobs held now."),
)
PREFIX = "sglang:kvtc_"


def format_line(c: Mapping[str, float]) -> str:
    """One log line in SGLang's ``Prefill batch. #new-seq: ...`` style."""
    return (
        f"KVTC cache. #compressed-token: {int(c.get('resident_tokens', 0))}, "
        f"#compressed-node: {int(c.get('resident_nodes', 0))}, "
        f"compressed: {c.get('resident_blob_bytes', 0) / 2**20:.2f} MiB, ratio: {c.get('ratio', 0.0):.2f}, "
        f"store usage: {c.get('store_use', 0.0):.2f}, #compression: {int(c.get('compressions', 0))}, "
        f"#restore: {int(c.get('restores', 0))}, #restored-token: {int(c.get('restored_tokens', 0))}, "
        f"restore-ms: {1e3 * c.get('restore_seconds', 0.0):.1f}, "
        f"compress-ms: {1e3 * c.get('compress_seconds', 0.0):.1f}, "
        f"#encoded-token: {int(c.get('encoded_tokens', 0))}, "
        f"scheduler-codec-ms: {1e3 * c.get('scheduler_codec_seconds', 0.0):.1f}, "
        f"#checksum-failure: {int(c.get('checksum_failures', 0))}, "
        f"#dropped-token: {int(c.get('dropped_tokens', 0))}, "
        f"#host-token: {int(c.get('host_resident_tokens', 0))}, "
        f"host: {c.get('host_resident_bytes', 0) / 2**20:.2f} MiB, "
        f"#host-hit-token: {int(c.get('host_restored_tokens', 0))}, "
        f"#host-dropped-token: {int(c.get('host_dropped_tokens', 0))}"
    )


def parse_line(line: str) -> dict[str, float]:
    """Inverse of :func:`format_line` for readers of the log (tests, the benchmark): ``{field: value}``."""
    head = "KVTC cache. "
    if head not in line:
        raise ValueError(f"not a KVTC cache line: {line!r}")
    out: dict[str, float] = {}
    for part in line.split(head, 1)[1].strip().split(", "):
        key, _, value = part.partition(": ")
        out[key.strip()] = float(value.split()[0])
    return out


@dataclass(frozen=True)
class ReporterConfig:
    """``interval``: seconds between unconditional lines; ``min_interval``: least seconds between lines."""

    interval: float = 30.0
    min_interval: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.min_interval <= self.interval:
            raise ValueError(f"need 0 < min_interval <= interval, got {self.min_interval}, {self.interval}")


class _Metrics:
    """The ``sglang:kvtc_*`` metrics in prometheus_client's (multiprocess) registry."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        self.counters = {k: Counter(PREFIX + name, text) for k, name, text in _COUNTERS}
        self.gauges = {k: Gauge(PREFIX + name, text, multiprocess_mode="mostrecent") for k, name, text in _GAUGES}
        self.last: dict[str, float] = {}

    def update(self, c: Mapping[str, float]) -> None:
        for key, metric in self.counters.items():
            value = float(c.get(key, 0.0))
            delta = value - self.last.get(key, 0.0)
            if delta > 0:  # totals only grow; a reset (flush) keeps the totals
                metric.inc(delta)
            self.last[key] = max(value, self.last.get(key, 0.0))
        for key, gauge in self.gauges.items():
            gauge.set(float(c.get(key, 0.0)))


class KVTCReporter:
    """Logs and exports the backend's counters (see the module docstring)."""

    def __init__(self, config: ReporterConfig | None = None, *, enable_metrics: bool | None = None) -> None:
        self.config = config or ReporterConfig()
        if enable_metrics is None:
            enable_metrics = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self._metrics = _Metrics() if enable_metrics else None
        self._last_logged: dict[str, float] | None = None
        self._last_time = float("-inf")
        self.lines = 0

    def tick(self, counters: Mapping[str, float], store_capacity_bytes: int = 0, now: float | None = None) -> None:
        """Called once per scheduler iteration with ``KVTCStats.as_dict()`` and the store's capacity."""
        now = time.monotonic() if now is None else now
        c = dict(counters)
        c["store_use"] = c.get("resident_store_bytes", 0) / store_capacity_bytes if store_capacity_bytes else 0.0
        since = now - self._last_time
        changed = self._last_logged is None or any(c[k] != self._last_logged.get(k) for k in c if k != "store_use")
        if since < self.config.min_interval:
            return
        if not changed and since < self.config.interval:
            return
        self._last_time = now
        self._last_logged = c
        self.lines += 1
        logger.info(format_line(c))
        if self._metrics is not None:
            self._metrics.update(c)
