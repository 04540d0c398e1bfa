"""Many agents against off-GPU tiers: one seeded agentic trace, every server one at a time, one table.

Servers (all but ``big`` at the same ``--max-total-tokens N``):

* ``vanilla``: SGLang's own radix cache;
* ``kvtc``: the kvtc backend, in-pool only (compressed blobs that must leave the pool's store are dropped);
* ``kvtc+host``: kvtc with ``--kvtc-host-bytes H`` (those blobs move to host memory, a match restores them);
* ``raw+host``: the same cache storing raw KV bytes (``--kvtc-codec raw --kvtc-host-bytes H``, same H): the
  stand-in for an uncompressed host tier (what HiCache stores);
* ``big``: vanilla at a pool that holds every session at once (the upper bound of any prefix cache).

The workload is :func:`.session_replay.replay` turn-major (``order="turn"``): the trace's sessions go turn by turn,
*every* session's turn ``t`` queued before any session's turn ``t + 1``, ``concurrency`` requests in flight. Each
agent so pauses for the other agents' turns between two of its own (its tool "runs"), and its KV goes cold: with
many agents, the sessions' KV together is far more than the pool holds even compressed, and what comes back is what
a tier kept. Each server's cache is flushed before each run and ``/metrics`` read before and after (the difference
counts).

The columns, shares, aims and the table are :mod:`.tier_report`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..cache.config import parse_bytes as parse_config_bytes
from .bench import BenchConfig, server_spec
from .bench_report import summarize
from .server import SGLangServer
from .server_metrics import server_counters
from .session_bench import flush
from .session_replay import ReplayConfig, replay
from .sessions import pool_for_everything
from .tier_report import (
    HOST_SERVERS,
    SERVERS,
    Entry,
    aims,
    capacity,
    format_report,
    measured_ratio,
    pooled,
    tier_shares,
)


def parse_bytes(value: str | int) -> int:
    """A byte count >= 1 (the config's ``parse_bytes``: ``96M``, ``96MiB``, ``1.5G``)."""
    return parse_config_bytes(value, minimum=1)


def raw_bytes_per_token(model_dir: str | Path, dtype_bytes: int = 2) -> int:
    """Bytes of one token's K and V over all layers (bf16 by default): what a raw tier stores per token."""
    c = json.loads((Path(model_dir) / "config.json").read_text())
    heads = c.get("num_key_value_heads", c["num_attention_heads"])
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * heads * head_dim * dtype_bytes


def default_host_bytes(context_tokens: int, bytes_per_token: int, share: float = 1 / 6) -> int:
    """``share`` of the sessions' KV at raw size, rounded up to a MiB: a raw tier overflows, a ~17x one does not."""
    return max(1, math.ceil(context_tokens * bytes_per_token * share / 2**20)) * 2**20


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
        results = replay(srv.url, trace, ReplayConfig(cfg.concurrency, cfg.output_tokens, cfg.request_timeout,
                                                      order="turn"))
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
    got = run_interleaved(cols, lambda e, run: run_entry(e, model, calibration, trace, cfg=cfg, run=run), cfg.runs,
                          cfg.out)
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


def run_interleaved(cols: list[Entry], run_one: Callable[[Entry, int], dict[str, Any]], runs: int, out: Path
                    ) -> dict[str, list[dict[str, Any]]]:
    """``run_one(entry, run)`` for every entry, ``runs`` times, interleaved (run 1 of every server, then run 2...);
    each server's summaries so far go to ``out/partial.json`` after every run (kept if a later server fails)."""
    got: dict[str, list[dict[str, Any]]] = {e.key: [] for e in cols}
    out.mkdir(parents=True, exist_ok=True)
    for run in range(runs):
        for e in cols:
            got[e.key].append(run_one(e, run))
            partial = {k: [g["summary"] for g in v] for k, v in got.items() if v}
            (out / "partial.json").write_text(json.dumps(partial, indent=1) + "\n")
    return got


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


def build_report(trace: dict[str, Any], cfg: TierBenchConfig, cols: list[Entry],
                 summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ratio = measured_ratio(summaries)
    return {"config": {k: str(v) for k, v in asdict(cfg).items()}, "trace_metadata": trace["metadata"],
            "columns": [{**asdict(e), "key": e.key} for e in cols], "summaries": summaries,
            "shares": tier_shares(summaries), "aims": aims(summaries, cfg.host_bytes),
            "capacity": capacity(trace, cfg.max_total_tokens, cfg.store_fraction, ratio) if ratio else None}
