"""What SGLang 0.5.23's ``/metrics`` (``--enable-metrics``) says about prefill work and kvtc's codec time.

Read from SGLang's source (``srt/observability/metrics_collector.py``, ``req_time_stats.py``) and checked
on a real CPU server (``tests/data/metrics_vanilla_cpu.txt``):

* ``sglang:realtime_tokens_total{mode="prefill_compute"}``: tokens the server prefilled (computed);
  ``mode="prefill_cache"``: prompt tokens taken from the cache. Counted per prefill batch.
* ``sglang:per_stage_req_latency_seconds{stage="prefill_forward"}`` (histogram): per request, the time from
  its first forward pass to the end of its prefill (all its chunks). Its ``_sum`` is *per request*: a prefill
  batch of k requests counts k times, and a request's chunks interleaved with other batches count their
  wall time. It is the only prefill time 0.5.23 exposes on CPU: the forward-pass timer
  (``sglang:forward_execution_seconds_total{category=...}``, ``SGLANG_ENABLE_METRICS_DEVICE_TIMER``) records
  CUDA events and does not run on a CPU server.
* ``sglang:scheduler_stage_seconds_total{category="run_batch"}``: wall time of every forward pass (prefill
  and decode together).
* kvtc: ``sglang:kvtc_scheduler_codec_seconds_total`` (codec time on the scheduler thread) when the backend
  exports it; else ``restore_seconds_total + compress_seconds_total``, labelled as that fallback.

The server log's ``Prefill batch`` lines carry ``#new-token`` and ``#cached-token`` per batch but no time
(their "input throughput" divides by the gap between two such lines, idle time included);
:func:`prefill_log_tokens` sums their token counts as a cross-check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?$")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')
_PREFILL_LINE = re.compile(r"Prefill batch.*?#new-token: (\d+), #cached-token: (\d+)")
CODEC_COUNTER = "sglang:kvtc_scheduler_codec_seconds_total"
CODEC_FALLBACK = ("sglang:kvtc_restore_seconds_total", "sglang:kvtc_compress_seconds_total")
KVTC_PREFIX = "sglang:kvtc_"


@dataclass(frozen=True)
class Sample:
    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, key: str) -> str | None:
        return dict(self.labels).get(key)


def parse_samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (comments skipped); raises ValueError on a bad line."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise ValueError(f"line {n}: expected 'name{{labels}} value', got {line[:120]!r}")
        labels = tuple(sorted(_LABEL.findall(m.group(3) or "")))
        out.append(Sample(m.group(1), labels, float(m.group(4))))
    return out


def metric_sum(samples: list[Sample], name: str, **labels: str) -> float | None:
    """Sum of the samples called ``name`` whose labels include ``labels``; ``None`` if there is none."""
    hits = [s.value for s in samples if s.name == name and all(s.label(k) == v for k, v in labels.items())]
    return sum(hits) if hits else None


@dataclass(frozen=True)
class ServerCounters:
    """Cumulative counters of one ``/metrics`` read (``None``: the server does not export it)."""

    prefill_tokens: float | None
    prefill_cache_tokens: float | None
    prefill_forward_seconds: float | None
    prefill_forward_requests: float | None
    run_batch_seconds: float | None
    codec_seconds: float | None
    codec_label: str
    kvtc: dict[str, float] = field(default_factory=dict)  # every sglang:kvtc_* sample, prefix dropped

    def minus(self, before: ServerCounters) -> ServerCounters:
        """The change since ``before`` (what one workload did on a server that ran others first)."""

        def d(a: float | None, b: float | None) -> float | None:
            return None if a is None else a - (b or 0.0)

        return ServerCounters(d(self.prefill_tokens, before.prefill_tokens),
                              d(self.prefill_cache_tokens, before.prefill_cache_tokens),
                              d(self.prefill_forward_seconds, before.prefill_forward_seconds),
                              d(self.prefill_forward_requests, before.prefill_forward_requests),
                              d(self.run_batch_seconds, before.run_batch_seconds),
                              d(self.codec_seconds, before.codec_seconds), self.codec_label,
                              {k: v - before.kvtc.get(k, 0.0) if k.endswith("_total") else v  # gauges: as now
                               for k, v in self.kvtc.items()})


def server_counters(text: str) -> ServerCounters:
    s = parse_samples(text)
    stage = "sglang:per_stage_req_latency_seconds"
    codec = metric_sum(s, CODEC_COUNTER)
    label = "kvtc scheduler codec s"
    if codec is None:
        parts = [metric_sum(s, name) for name in CODEC_FALLBACK]
        codec = None if all(p is None for p in parts) else sum(p or 0.0 for p in parts)
        label = "kvtc restore + compress s (no scheduler-codec counter yet)"
    return ServerCounters(
        prefill_tokens=metric_sum(s, "sglang:realtime_tokens_total", mode="prefill_compute"),
        prefill_cache_tokens=metric_sum(s, "sglang:realtime_tokens_total", mode="prefill_cache"),
        prefill_forward_seconds=metric_sum(s, stage + "_sum", stage="prefill_forward"),
        prefill_forward_requests=metric_sum(s, stage + "_count", stage="prefill_forward"),
        run_batch_seconds=metric_sum(s, "sglang:scheduler_stage_seconds_total", category="run_batch"),
        codec_seconds=codec, codec_label=label, kvtc=kvtc_values(s))


def kvtc_values(samples: list[Sample]) -> dict[str, float]:
    """``{name without "sglang:kvtc_": value}`` (labelled samples of one name summed)."""
    out: dict[str, float] = {}
    for x in samples:
        if x.name.startswith(KVTC_PREFIX):
            key = x.name.removeprefix(KVTC_PREFIX)
            out[key] = out.get(key, 0.0) + x.value
    return out


def prefill_log_tokens(log_text: str) -> tuple[int, int, int]:
    """``(batches, new tokens, cached tokens)`` summed over the log's ``Prefill batch`` lines."""
    batches = new = cached = 0
    for m in _PREFILL_LINE.finditer(log_text):
        batches += 1
        new += int(m.group(1))
        cached += int(m.group(2))
    return batches, new, cached
