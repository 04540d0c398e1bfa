"""The tier benchmark's columns, shares, aims and table (:mod:`.tier_bench` runs the servers): pure functions
over per-server summaries, no server and no model.

The share of the big pool's gain a server captures is ``(X_vanilla - X_server) / (X_vanilla - X_big)`` for mean
TTFT and tokens prefilled (:func:`.bench_report.share_of_gain`).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from .bench_report import share_of_gain, summarize
from .server_metrics import ServerCounters
from .session_replay import TurnResult

SERVERS = ("vanilla", "kvtc", "kvtc+host", "raw+host", "big")
HOST_SERVERS = ("kvtc+host", "raw+host")
AIM_TTFT_SHARE = 0.80  # kvtc+host captures at least this share of the big pool's TTFT gain
AIM_RAW_FRACTION = 0.5  # raw+host captures less than this fraction of what kvtc+host captures
AIM_DENSITY = 15.0  # the compressed tier holds at least this many times the raw tier's tokens per host byte


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}M" if n % 2**20 == 0 else f"{n / 2**20:.1f}M"


@dataclass(frozen=True)
class Entry:
    """One column of the table: a server kind, its pool and (host kinds) its host budget."""

    kind: str
    pool: int
    host_bytes: int = 0

    @property
    def key(self) -> str:
        return f"{self.kind}@{mib(self.host_bytes)}" if self.kind in HOST_SERVERS else self.kind

    @property
    def backend(self) -> str:
        return "vanilla" if self.kind in ("vanilla", "big") else "kvtc"

    def flags(self) -> list[str]:
        out = []
        if self.kind == "raw+host":
            out += ["--kvtc-codec", "raw"]
        if self.kind in HOST_SERVERS:
            out += ["--kvtc-host-bytes", str(self.host_bytes)]
        return out


# ----- summaries, shares, aims -----


def add_counters(a: ServerCounters | None, b: ServerCounters | None) -> ServerCounters | None:
    """Counters of two runs together: ``*_total`` and SGLang counters summed, gauges (kvtc) as in ``b``."""
    if a is None or b is None:
        return a or b

    def s(x: float | None, y: float | None) -> float | None:
        return None if x is None and y is None else (x or 0.0) + (y or 0.0)

    kv = {k: (a.kvtc.get(k, 0.0) + v if k.endswith("_total") else v) for k, v in b.kvtc.items()}
    return ServerCounters(s(a.prefill_tokens, b.prefill_tokens), s(a.prefill_cache_tokens, b.prefill_cache_tokens),
                          s(a.prefill_forward_seconds, b.prefill_forward_seconds),
                          s(a.prefill_forward_requests, b.prefill_forward_requests),
                          s(a.run_batch_seconds, b.run_batch_seconds), s(a.codec_seconds, b.codec_seconds),
                          b.codec_label, kv)


def tokens_per_byte(summary: dict[str, Any]) -> float | None:
    """Tokens a host tier holds per byte of its budget: resident tokens / resident bytes at the end of the run
    (``None`` without host residents)."""
    kv = summary.get("kvtc") or {}
    tokens, used = kv.get("host_resident_tokens"), kv.get("host_resident_bytes")
    if tokens and used:
        return tokens / used
    return None


def tier_shares(summaries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per server (but vanilla and big): the share of the big pool's gain in mean TTFT, tokens prefilled (usage)
    and tokens prefilled (SGLang's counter); ``{}`` without vanilla and big."""
    if "vanilla" not in summaries or "big" not in summaries:
        return {}
    v, b = summaries["vanilla"], summaries["big"]
    out: dict[str, dict[str, Any]] = {}
    for key, s in summaries.items():
        if key in ("vanilla", "big"):
            continue
        out[key] = {}
        for metric in ("ttft_mean", "prefilled_tokens", "server_prefill_tokens"):
            if None in (v.get(metric), s.get(metric), b.get(metric)):
                continue
            share = share_of_gain(v[metric], s[metric], b[metric])
            out[key][metric] = {"value": share.value, "note": share.note}
    return out


def _share(shares: dict[str, dict[str, Any]], key: str, metric: str = "ttft_mean") -> float | None:
    return shares.get(key, {}).get(metric, {}).get("value")


def aims(summaries: dict[str, dict[str, Any]], host_bytes: tuple[int, ...]) -> list[dict[str, Any]]:
    """The three aims at each host budget, each ``{"aim", "met" (True/False/None: not measurable), "detail"}``."""
    shares = tier_shares(summaries)
    out = []
    for h in host_bytes:
        k, r = Entry("kvtc+host", 0, h).key, Entry("raw+host", 0, h).key
        ks, rs = _share(shares, k), _share(shares, r)
        out.append({"aim": f"kvtc+host @ H={mib(h)} captures >= {AIM_TTFT_SHARE:.0%} of the big pool's TTFT gain",
                    "met": None if ks is None else ks >= AIM_TTFT_SHARE,
                    "detail": "n/a" if ks is None else f"{ks:.0%}"})
        met = None if ks is None or rs is None else (ks > 0 and rs < AIM_RAW_FRACTION * ks)
        detail = "n/a" if met is None else f"raw+host {rs:.0%} vs kvtc+host {ks:.0%}"
        out.append({"aim": f"raw+host @ H={mib(h)} captures less than half of what kvtc+host captures",
                    "met": met, "detail": detail})
        kd, rd = (tokens_per_byte(summaries[x]) if x in summaries else None for x in (k, r))
        ratio = kd / rd if kd and rd else None
        out.append({"aim": f"the compressed tier holds >= {AIM_DENSITY:.0f}x the raw tier's tokens at equal bytes "
                    f"(H={mib(h)})", "met": None if ratio is None else ratio >= AIM_DENSITY,
                    "detail": "n/a (no host residents)" if ratio is None else
                    f"{ratio:.1f}x: kvtc {1 / kd:.0f} B/token, raw {1 / rd:.0f} B/token in host memory"})
    return out


def pooled(runs: list[dict[str, Any]], results: list[list[TurnResult]], walls: list[float],
           counters: list[ServerCounters | None]) -> dict[str, Any]:
    """One server's summary over all its runs (requests together, walls and counters summed)."""
    total: ServerCounters | None = None
    for c in counters:
        total = add_counters(total, c)
    summary = summarize([r for rs in results for r in rs], sum(walls), total)
    return {**summary, "runs": runs} if len(runs) > 1 else summary


def capacity(trace: dict[str, Any], pool: int, store_fraction: float, ratio: float) -> dict[str, float]:
    """What the pool of N holds at most (raw slots plus the compressed store at ``ratio``) against the sessions'
    KV (their final contexts together)."""
    holds = (1 - store_fraction) * pool + store_fraction * pool * ratio
    total = trace["metadata"]["estimated_context_total"]
    return {"session_kv_tokens": total, "pool_holds_compressed_tokens": holds, "ratio": ratio,
            "sessions_over_pool": total / holds}


def measured_ratio(summaries: dict[str, dict[str, Any]]) -> float | None:
    """kvtc's compression ratio as served: the kvtc runs' ``compression_ratio`` gauge (resident blobs)."""
    xs = [s["kvtc"]["compression_ratio"] for k, s in summaries.items()
          if k.startswith("kvtc") and (s.get("kvtc") or {}).get("compression_ratio")]
    return statistics.mean(xs) if xs else None


# ----- the table -----


def _kv(s: dict[str, Any], name: str, fmt: str = ".0f", scale: float = 1.0) -> str:
    kv = s.get("kvtc") or {}
    return "-" if name not in kv else format(kv[name] * scale, fmt)


def _share_cell(shares: dict[str, dict[str, Any]], key: str, metric: str) -> str:
    if key == "vanilla":
        return "0% (reference)"
    if key == "big":
        return "100% (reference)"
    v = _share(shares, key, metric)
    return "n/a" if v is None else f"{v:.0%}"


def _host(s: dict[str, Any]) -> str:
    kv = s.get("kvtc") or {}
    if "host_hits_total" not in kv:
        return "-"
    return (f"{kv['host_hits_total']:.0f} / {kv.get('host_hit_tokens_total', 0):.0f} / "
            f"{kv.get('host_seconds_total', 0):.2f}")


def _density(s: dict[str, Any]) -> str:
    d = tokens_per_byte(s)
    return "-" if d is None else f"{1 / d:.0f}"


ROWS = (
    ("requests (errors)", lambda k, s, sh: f"{s['requests']} ({s['errors']})"),
    ("TTFT mean / p90 (s)", lambda k, s, sh: f"{s['ttft_mean']:.2f} / {s['ttft_p90']:.2f}"),
    ("TTFT per turn (s)", lambda k, s, sh: ", ".join(f"{x:.2f}" for x in s["ttft_per_turn"])),
    ("**share of the big pool's TTFT gain**", lambda k, s, sh: _share_cell(sh, k, "ttft_mean")),
    ("prompt / cached tokens (usage)", lambda k, s, sh: f"{s['prompt_tokens']} / {s['cached_tokens']}"),
    ("tokens prefilled (prompt - cached)", lambda k, s, sh: f"{s['prefilled_tokens']}"),
    ("tokens prefilled (server counter)",
     lambda k, s, sh: "-" if s["server_prefill_tokens"] is None else f"{s['server_prefill_tokens']:.0f}"),
    ("share of the big pool's prefill saving", lambda k, s, sh: _share_cell(sh, k, "prefilled_tokens")),
    ("kvtc restored tokens (all tiers) / dropped tokens (pool store)",
     lambda k, s, sh: "-" if not s.get("kvtc") else
     f"{_kv(s, 'restored_tokens_total')} / {_kv(s, 'dropped_tokens_total')}"),
    ("host hits / tokens / seconds", lambda k, s, sh: _host(s)),
    ("host demotions / MiB demoted", lambda k, s, sh: "-" if "host_demotions_total" not in (s.get("kvtc") or {})
     else f"{_kv(s, 'host_demotions_total')} / {_kv(s, 'host_demoted_bytes_total', '.1f', 2**-20)}"),
    ("host dropped tokens / full", lambda k, s, sh: "-" if "host_dropped_tokens_total" not in (s.get("kvtc") or {})
     else f"{_kv(s, 'host_dropped_tokens_total')} / {_kv(s, 'host_full_total')}"),
    ("host resident at end: tokens / MiB", lambda k, s, sh: "-" if "host_resident_tokens" not in (s.get("kvtc") or {})
     else f"{_kv(s, 'host_resident_tokens')} / {_kv(s, 'host_resident_bytes', '.1f', 2**-20)}"),
    ("host bytes per resident token", lambda k, s, sh: _density(s)),
    ("kvtc codec s", lambda k, s, sh: "-" if s["codec_s"] is None else f"{s['codec_s']:.2f}"),
    ("all forward passes s (run_batch)",
     lambda k, s, sh: "-" if s["run_batch_s"] is None else f"{s['run_batch_s']:.1f}"),
    ("workload wall time (s)", lambda k, s, sh: f"{s['wall_s']:.1f}"),
    ("machine load (1-min average) before / after", lambda k, s, sh: " / ".join(f"{x:.1f}" for x in s["loadavg_1m"])
     if s.get("loadavg_1m") else "-"),
)


def column_label(col: dict[str, Any]) -> str:
    host = f", H={mib(col['host_bytes'])}" if col["kind"] in HOST_SERVERS else ""
    return f"{'vanilla (big)' if col['kind'] == 'big' else col['kind']} @ {col['pool']}{host}"


def spread_lines(report: dict[str, Any]) -> list[str]:
    """Per run: each server's mean TTFT and share of the big pool's TTFT gain (``runs`` > 1 only)."""
    summaries = report["summaries"]
    per_run = {k: s.get("runs") for k, s in summaries.items()}
    if any(not r for r in per_run.values()):
        return []
    n = min(len(r) for r in per_run.values())
    lines = [f"\nPer run ({n} runs, interleaved: run 1 of every server, then run 2...):", ""]
    for i in range(n):
        run = {k: r[i] for k, r in per_run.items()}
        sh = tier_shares(run)
        cells = [f"{k} {s['ttft_mean']:.2f} s" + (f" ({_share_cell(sh, k, 'ttft_mean')})" if k in sh else "")
                 for k, s in run.items()]
        lines.append(f"- run {i + 1}: " + ", ".join(cells))
    for k, r in per_run.items():
        xs = [x["ttft_mean"] for x in r[:n]]
        lines.append(f"- {k}: TTFT mean min {min(xs):.2f} s, max {max(xs):.2f} s, spread "
                     f"{(max(xs) - min(xs)) / max(statistics.mean(xs), 1e-9):.0%} of the mean")
    return lines


def format_report(report: dict[str, Any]) -> str:
    meta = report["trace_metadata"]
    c = meta["config"]
    cfg = report["config"]
    cols = report["columns"]
    summaries, shares = report["summaries"], report["shares"]
    parts = [f"Many agents, turn-interleaved: {c['sessions']} sessions x {c['turns']} turns (first read "
             f"{c['first_read_tokens']} tokens of real code, tool outputs {c['tool_tokens']}, {c['output_tokens']} "
             f"answer tokens), {cfg['concurrency']} requests in flight; {meta['estimated_prompt_tokens_total']} "
             f"prompt tokens in all, the sessions' final contexts {meta['estimated_context_total']} tokens together; "
             f"pool N = {cfg['max_total_tokens']} (kvtc store fraction {cfg['store_fraction']}); runs: {cfg['runs']}."]
    cap = report.get("capacity")
    if cap:
        parts.append(f"The pool of N holds at most {cap['pool_holds_compressed_tokens']:.0f} tokens even compressed "
                     f"(raw slots plus the store at kvtc's measured {cap['ratio']:.1f}x): the sessions' KV is "
                     f"{cap['sessions_over_pool']:.1f}x that.")
    if report.get("merged_from"):
        parts.append("Columns measured in: " + ", ".join(f"{k} {v}" for k, v in report["merged_from"].items()) + ".")
    parts += ["", "| | " + " | ".join(column_label(x) for x in cols) + " |", "|---|" + "---|" * len(cols)]
    parts += [f"| {label} | " + " | ".join(fn(x["key"], summaries[x["key"]], shares) for x in cols) + " |"
              for label, fn in ROWS]
    parts += ["", "Aims:", ""]
    for a in report["aims"]:
        met = "not measurable" if a["met"] is None else ("**met**" if a["met"] else "**not met**")
        parts.append(f"- {a['aim']}: {met} ({a['detail']})")
    parts += spread_lines(report)
    parts.append("\nShare of the big pool's gain: (X_vanilla - X) / (X_vanilla - X_big), X = mean TTFT or tokens "
                 "prefilled (prompt - cached of each request's usage). Host figures: SGLang's /metrics "
                 "(sglang:kvtc_host_*), the difference over the run; resident figures are the gauges at its end.")
    return "\n".join(parts)
