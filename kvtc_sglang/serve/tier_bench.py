"""Many agents against off-GPU tiers: one seeded agentic trace, every server one at a time, one table.

Servers (all but ``big`` at the same ``--max-total-tokens N``):

* ``vanilla``: SGLang's own radix cache;
* ``kvtc``: the kvtc backend, in-pool only (compressed blobs that must leave the pool's store are dropped);
* ``kvtc+host``: kvtc with ``--kvtc-host-bytes H`` (those blobs move to host memory, a match restores them);
* ``raw+host``: the same cache storing raw KV bytes (``--kvtc-codec raw --kvtc-host-bytes H``, same H): the
  stand-in for an uncompressed host tier (what HiCache stores);
* ``big``: vanilla at a pool that holds every session at once (the upper bound of any prefix cache).

The workload is :func:`interleaved_replay`: the trace's sessions go turn by turn, *every* session's turn ``t``
queued before any session's turn ``t + 1``, ``concurrency`` requests in flight. Each agent so pauses for the
other agents' turns between two of its own (its tool "runs"), and its KV goes cold: with many agents, the
sessions' KV together is far more than the pool holds even compressed, and what comes back is what a tier kept.
Each server's cache is flushed before each run and ``/metrics`` read before and after (the difference counts).

The share of the big pool's gain a server captures is ``(X_vanilla - X_server) / (X_vanilla - X_big)`` for mean
TTFT and tokens prefilled (:func:`.bench_report.share_of_gain`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..cache.config import parse_bytes as parse_config_bytes
from .bench import BenchConfig, server_spec
from .bench_report import share_of_gain, summarize
from .server import SGLangServer
from .server_metrics import ServerCounters, server_counters
from .session_bench import flush
from .session_replay import Message, ReplayConfig, TurnResult, stream_chat
from .sessions import pool_for_everything

SERVERS = ("vanilla", "kvtc", "kvtc+host", "raw+host", "big")
HOST_SERVERS = ("kvtc+host", "raw+host")
AIM_TTFT_SHARE = 0.80  # kvtc+host captures at least this share of the big pool's TTFT gain
AIM_RAW_FRACTION = 0.5  # raw+host captures less than this fraction of what kvtc+host captures
AIM_DENSITY = 15.0  # the compressed tier holds at least this many times the raw tier's tokens per host byte


def parse_bytes(value: str | int) -> int:
    """A byte count >= 1 (the config's ``parse_bytes``: ``96M``, ``96MiB``, ``1.5G``)."""
    return parse_config_bytes(value, minimum=1)


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}M" if n % 2**20 == 0 else f"{n / 2**20:.1f}M"


def raw_bytes_per_token(model_dir: str | Path, dtype_bytes: int = 2) -> int:
    """Bytes of one token's K and V over all layers (bf16 by default): what a raw tier stores per token."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    heads = c.get("num_key_value_heads", c["num_attention_heads"])
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * heads * head_dim * dtype_bytes


def default_host_bytes(context_tokens: int, bytes_per_token: int, share: float = 1 / 6) -> int:
    """``share`` of the sessions' KV at raw size, rounded up to a MiB: a raw tier overflows, a ~17x one does not."""
    return max(1, math.ceil(context_tokens * bytes_per_token * share / 2**20)) * 2**20


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


def entries(servers: tuple[str, ...], pool: int, big_pool: int, host_bytes: tuple[int, ...]) -> list[Entry]:
    """The table's columns in run order: host kinds once per host budget (kvtc+host then raw+host at each H)."""
    bad = [s for s in servers if s not in SERVERS]
    if bad or not servers:
        raise ValueError(f"servers must be a non-empty subset of {SERVERS}, got {servers}")
    if any(s in HOST_SERVERS for s in servers) and not host_bytes:
        raise ValueError("kvtc+host and raw+host need at least one host budget, got none")
    out: list[Entry] = []
    for kind in (k for k in SERVERS if k in servers):
        if kind == "kvtc+host" or (kind == "raw+host" and "kvtc+host" not in servers):
            out += [Entry(k, pool, h) for h in host_bytes for k in HOST_SERVERS if k in servers]
        elif kind not in HOST_SERVERS:
            out.append(Entry(kind, big_pool if kind == "big" else pool))
    return out


# ----- the workload -----


def interleaved_replay(base_url: str, trace: dict[str, Any], cfg: ReplayConfig, model: str = "default"
                       ) -> list[TurnResult]:
    """Replay ``trace`` turn-major: every session's turn ``t`` is queued before any session's turn ``t + 1``;
    ``cfg.concurrency`` requests in flight; a turn waits for its session's previous turn (queued earlier, so
    already running or done: no deadlock). Streamed, ``temperature=0``, the server's answer appended to the
    session's history as in :mod:`.session_replay`. Results in trace order (session, then turn)."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=cfg.timeout)
    convs = [[t for t in conv if t.get("messages")] for conv in trace["conversations"]]
    order = [(t, s) for t in range(max(map(len, convs), default=0)) for s in range(len(convs)) if t < len(convs[s])]
    histories: list[list[Message]] = [[] for _ in convs]
    done = [[threading.Event() for _ in conv] for conv in convs]
    results = [[TurnResult(s, t) for t in range(len(conv))] for s, conv in enumerate(convs)]
    queue = iter(order)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                job = next(queue, None)
            if job is None:
                return
            t, s = job
            try:
                if t and not done[s][t - 1].wait(cfg.timeout * 2):
                    results[s][t].error = "previous turn did not finish"
                    continue
                histories[s] += [{"role": m["role"], "content": m["content"]} for m in convs[s][t]["messages"]]
                stream_chat(client, model, list(histories[s]), cfg, results[s][t])
                histories[s].append({"role": "assistant", "content": results[s][t].text})
            finally:
                done[s][t].set()

    with ThreadPoolExecutor(cfg.concurrency) as pool:
        for fut in [pool.submit(worker) for _ in range(cfg.concurrency)]:
            fut.result()
    return [r for rs in results for r in rs]


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


# ----- running -----


@dataclass(frozen=True)
class TierBenchConfig:
    max_total_tokens: int = 2048
    big_pool: int | None = None
    host_bytes: tuple[int, ...] = ()
    servers: tuple[str, ...] = SERVERS
    page_size: int = 1
    store_fraction: float = 0.125
    concurrency: int = 2
    output_tokens: int = 8
    runs: int = 1
    start_timeout: float = 400.0
    request_timeout: float = 600.0
    out: Path = Path("out/tier_bench")

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise ValueError(f"runs must be >= 1, got {self.runs}")
        if self.max_total_tokens < 1:
            raise ValueError(f"max_total_tokens must be >= 1, got {self.max_total_tokens}")


def run_entry(entry: Entry, model: str, calibration: str, trace: dict[str, Any], *, cfg: TierBenchConfig, run: int
              ) -> dict[str, Any]:
    """Start one server, flush, replay the trace, read ``/metrics`` (difference), stop it."""
    bc = BenchConfig(max_total_tokens=entry.pool, page_size=cfg.page_size, store_fraction=cfg.store_fraction,
                     start_timeout=cfg.start_timeout, out=cfg.out)
    spec = server_spec(entry.backend, model, calibration, bc, entry.flags())
    logs = cfg.out / "logs"
    tag = f"{entry.key.replace('+', '_').replace('@', '_')}_r{run + 1}"
    t0 = time.perf_counter()
    with SGLangServer(spec, logs / f"server_{tag}.log", start_timeout=cfg.start_timeout) as srv:
        startup = time.perf_counter() - t0
        flush(srv)
        before = server_counters(srv.get("/metrics")[1])
        load_before = os.getloadavg()[0]  # the machine is shared: record how busy it was
        t1 = time.perf_counter()
        results = interleaved_replay(srv.url, trace, ReplayConfig(cfg.concurrency, cfg.output_tokens,
                                                                  cfg.request_timeout))
        wall = time.perf_counter() - t1
        text = srv.get("/metrics")[1]
        (logs / f"metrics_{tag}.txt").write_text(text)
        counters = server_counters(text).minus(before)
    summary = {**summarize(results, wall, counters), "loadavg_1m": [load_before, os.getloadavg()[0]]}
    print(f"[{entry.key} @ {entry.pool}, run {run + 1}] started in {startup:.0f} s; {summary['requests']} requests "
          f"({summary['errors']} errors), TTFT mean {summary['ttft_mean']:.2f} s, {summary['prefilled_tokens']} "
          f"tokens prefilled, host hits {(summary['kvtc'] or {}).get('host_hits_total', '-')}, {wall:.0f} s",
          flush=True)
    return {"summary": summary, "results": results, "wall": wall, "counters": counters, "startup_s": startup}


def run_bench(model: str, calibration: str, trace: dict[str, Any], cfg: TierBenchConfig) -> dict[str, Any]:
    """Every entry ``cfg.runs`` times, the runs interleaved (run 1 of every server, then run 2...);
    writes ``report.json`` and ``report.md`` into ``cfg.out``."""
    big = cfg.big_pool or max(pool_for_everything(trace, cfg.page_size), 2 * cfg.max_total_tokens)
    cols = entries(cfg.servers, cfg.max_total_tokens, big, cfg.host_bytes)
    got: dict[str, list[dict[str, Any]]] = {e.key: [] for e in cols}
    cfg.out.mkdir(parents=True, exist_ok=True)
    for run in range(cfg.runs):
        for e in cols:
            got[e.key].append(run_entry(e, model, calibration, trace, cfg=cfg, run=run))
            partial = {k: [g["summary"] for g in v] for k, v in got.items() if v}  # kept if a later server fails
            (cfg.out / "partial.json").write_text(json.dumps(partial, indent=1) + "\n")
    summaries = {e.key: pooled([g["summary"] for g in got[e.key]], [g["results"] for g in got[e.key]],
                               [g["wall"] for g in got[e.key]], [g["counters"] for g in got[e.key]]) for e in cols}
    report = build_report(trace, cfg, cols, summaries)
    report["servers"] = {e.key: {"startup_s": [g["startup_s"] for g in got[e.key]], "flags": e.flags()}
                         for e in cols}
    report["requests"] = {k: [{"run": i, **asdict(r)} for i, g in enumerate(v) for r in g["results"]]
                          for k, v in got.items()}
    (cfg.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (cfg.out / "report.md").write_text(format_report(report) + "\n")
    return report


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several on the same trace (a server re-run alone): every column, a later report's
    measurement of a column replacing an earlier one's; shares and aims recomputed."""
    if not reports:
        raise ValueError("expected at least one report to merge, got none")
    first = reports[0]
    cols: dict[str, dict[str, Any]] = {}
    summaries: dict[str, dict[str, Any]] = {}
    sources: dict[str, str] = {}
    for r in reports:
        if r["trace_metadata"] != first["trace_metadata"]:
            raise ValueError("reports to merge must replay the same trace (their trace metadata differ)")
        for c in r["columns"]:
            cols[c["key"]] = c
            summaries[c["key"]] = r["summaries"][c["key"]]
            sources[c["key"]] = r["config"].get("out", "?")
    kinds = {k: SERVERS.index(c["kind"]) for k, c in cols.items()}
    order = sorted(cols, key=lambda k: (kinds[k], cols[k]["host_bytes"]))
    hosts = tuple(sorted({c["host_bytes"] for c in cols.values() if c["kind"] in HOST_SERVERS}))
    ratio = measured_ratio(summaries)
    cfg = dict(first["config"])
    extra = {part: {k: v for r in reports for k, v in r.get(part, {}).items()} for part in ("servers", "requests")}
    return {**first, **extra, "columns": [cols[k] for k in order], "summaries": {k: summaries[k] for k in order},
            "shares": tier_shares(summaries), "aims": aims(summaries, hosts), "merged_from": sources,
            "capacity": capacity({"metadata": first["trace_metadata"]}, int(cfg["max_total_tokens"]),
                                 float(cfg["store_fraction"]), ratio) if ratio else None}


def measured_ratio(summaries: dict[str, dict[str, Any]]) -> float | None:
    """kvtc's compression ratio as served: the kvtc runs' ``compression_ratio`` gauge (resident blobs)."""
    xs = [s["kvtc"]["compression_ratio"] for k, s in summaries.items()
          if k.startswith("kvtc") and (s.get("kvtc") or {}).get("compression_ratio")]
    return statistics.mean(xs) if xs else None


def build_report(trace: dict[str, Any], cfg: TierBenchConfig, cols: list[Entry],
                 summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ratio = measured_ratio(summaries)
    return {"config": {k: str(v) for k, v in asdict(cfg).items()}, "trace_metadata": trace["metadata"],
            "columns": [{**asdict(e), "key": e.key} for e in cols], "summaries": summaries,
            "shares": tier_shares(summaries), "aims": aims(summaries, cfg.host_bytes),
            "capacity": capacity(trace, cfg.max_total_tokens, cfg.store_fraction, ratio) if ratio else None}


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

