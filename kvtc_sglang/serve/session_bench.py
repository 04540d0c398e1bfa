"""Three servers per workload, one at a time: vanilla at ``--max-total-tokens N``, kvtc at N, vanilla at a pool
that holds everything (``big``: the upper bound of any prefix cache).

Each server runs every workload in turn, its radix cache flushed (``/flush_cache``) before each one, and
``/metrics`` read before and after each (the report shows the difference). Workloads:

* ``serving``: SGLang's ``python -m sglang.benchmark.serving --dataset-name agentic-trace`` on the trace;
* ``gsp``: the same benchmark's ``generated-shared-prefix`` dataset with ``--gsp-num-turns``;
* ``own``: this project's ``openai``-client replay of the same trace (:mod:`.session_replay`);
* any :class:`Workload` a caller adds (the main job adds its shared-system-prompt workload).

Servers are started only through :class:`.server.SGLangServer` (the process group is always killed).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import sglang_bench
from .bench import BenchConfig, server_spec
from .bench_report import FOOTNOTE, SERVERS, format_table, shares, summarize
from .server import SGLangServer
from .server_metrics import ServerCounters, server_counters
from .session_replay import ORDERS, ReplayConfig, TurnResult, replay
from .sessions import pool_for_everything, turn_counts
from .workload import WorkloadConfig, run_shared_prompt

WORKLOADS = ("serving", "gsp", "own")


@dataclass(frozen=True)
class SessionBenchConfig:
    """How the three servers are run.

    Attributes:
        max_total_tokens: N, the pool of ``vanilla`` and ``kvtc``.
        big_pool: the pool of ``big``; ``None``: enough for every session (and GSP conversation) at once.
        kvtc_flags: extra flags for the kvtc server only (e.g. ``--kvtc-window-tokens 64``), passed through.
        big_max_running: SGLang's ``--max-running-requests`` for the big-pool server only: everything stays cached
            but no more requests run at once than the pool of N admits, so its gain is the caching alone (what
            a prefix cache at equal memory can hope for), without the extra concurrency of a bigger pool.
        servers, workloads: which ones to run, in this order.
        repeats: runs of each workload on each server (its cache flushed before each run); the report pools
            every run's requests and shows the kvtc/vanilla TTFT ratio and the share of the big pool's gain
            per run, so run-to-run noise is visible next to the difference.
        warmup_runs: runs of each workload on each server before the measured ones, their results discarded (a
            server's first run pays one-time costs: 1.1-1.3x the TTFT of later runs on this CPU, BENCHMARKS.md).
        replay_order: how ``own`` replays the trace (:class:`.session_replay.ReplayConfig`): ``"session"`` as
            SGLang's benchmark does, or ``"turn"``-major; requests in flight: the trace's ``concurrency``.
    """

    max_total_tokens: int = 8192
    big_pool: int | None = None
    page_size: int = 1
    store_fraction: float = 0.25
    idle_seconds: float | None = None
    kvtc_flags: tuple[str, ...] = ()
    big_max_running: int | None = None
    servers: tuple[str, ...] = SERVERS
    workloads: tuple[str, ...] = ("serving", "own")
    repeats: int = 1
    warmup_runs: int = 0
    replay_order: str = "session"
    start_timeout: float = 400.0
    workload_timeout: float = 3600.0
    out: Path = Path("out/sessions")

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup_runs < 0:
            raise ValueError(f"warmup_runs must be >= 0, got {self.warmup_runs}")
        if self.replay_order not in ORDERS:
            raise ValueError(f"replay_order must be one of {ORDERS}, got {self.replay_order!r}")
        if self.max_total_tokens < 1:
            raise ValueError(f"max_total_tokens must be >= 1, got {self.max_total_tokens}")
        for kind, names, known in (("server", self.servers, SERVERS), ("workload", self.workloads, WORKLOADS)):
            bad = [n for n in names if n not in known]
            if bad or not names:
                raise ValueError(f"{kind}s must be a non-empty subset of {known}, got {names}")


@dataclass
class Outcome:
    """What a workload returns: per-request results, wall time, and SGLang's throughput if it measured one."""

    results: list[TurnResult]
    wall: float
    throughput: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    name: str
    run: Callable[[SGLangServer, str, Path], Outcome]  # (server, server name, log dir) -> outcome


def gsp_context_total(cfg: sglang_bench.GSPConfig) -> int:
    per_conv = cfg.turns * (cfg.question_tokens + cfg.output_tokens + 16)
    return cfg.groups * cfg.system_prompt_tokens + cfg.groups * cfg.prompts_per_group * per_conv


def pools(cfg: SessionBenchConfig, trace: dict[str, Any], gsp: sglang_bench.GSPConfig | None) -> dict[str, int]:
    big = cfg.big_pool
    if big is None:
        need = pool_for_everything(trace, cfg.page_size)
        if gsp is not None and "gsp" in cfg.workloads:
            need = max(need, int(-(-gsp_context_total(gsp) * 1.25 // 1024) * 1024))
        big = max(need, 2 * cfg.max_total_tokens)
    return {"vanilla": cfg.max_total_tokens, "kvtc": cfg.max_total_tokens, "big": big}


def _outcome(r: sglang_bench.BenchRun) -> Outcome:
    """SGLang's measured duration (its own start-up and data generation excluded) and its throughput."""
    wall = float(r.summary.get("duration", r.seconds))
    return Outcome(r.results, wall, r.summary.get("request_throughput"), {"sglang": r.summary, "process_s": r.seconds})


def standard_workloads(cfg: SessionBenchConfig, model: str, trace_path: Path, trace: dict[str, Any],
                       gsp: sglang_bench.GSPConfig | None) -> list[Workload]:
    meta = trace["metadata"]["config"]
    turns = turn_counts(trace)
    timeout = cfg.workload_timeout

    def serving(srv: SGLangServer, name: str, logs: Path) -> Outcome:
        out = logs / f"serving_{name}.jsonl"
        cmd = sglang_bench.agentic_command(srv.url, model, trace_path, trace, out)
        return _outcome(sglang_bench.run(cmd, out, turns, logs / f"serving_{name}.log", timeout))

    def gsp_run(srv: SGLangServer, name: str, logs: Path) -> Outcome:
        if gsp is None:
            raise ValueError("the gsp workload needs a GSPConfig, got None")
        out = logs / f"gsp_{name}.jsonl"
        return _outcome(sglang_bench.run(sglang_bench.gsp_command(srv.url, model, gsp, out), out,
                                         [gsp.turns] * (gsp.groups * gsp.prompts_per_group), logs / f"gsp_{name}.log",
                                         timeout))

    def own(srv: SGLangServer, name: str, logs: Path) -> Outcome:
        rc = ReplayConfig(concurrency=meta["concurrency"], order=cfg.replay_order,
                          output_tokens=meta["output_tokens"], timeout=timeout)
        t0 = time.perf_counter()
        results = replay(srv.url, trace, rc)
        return Outcome(results, time.perf_counter() - t0)

    table = {"serving": serving, "gsp": gsp_run, "own": own}
    return [Workload(w, table[w]) for w in cfg.workloads]


def shared_prompt_workload(wl: WorkloadConfig) -> Workload:
    """The main job's shared-system-prompt workload (:func:`.workload.run_shared_prompt`) as a :class:`Workload`."""

    def run(srv: SGLangServer, name: str, logs: Path) -> Outcome:
        import openai

        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        r = run_shared_prompt(client, "default", wl, lambda: None)
        results = [TurnResult(u, 0, prompt_tokens=x.prompt_tokens, cached_tokens=x.cached_tokens, ttft=x.ttft,
                              latency=x.latency, text=x.text, error=x.error) for u, x in enumerate(r.results)]
        return Outcome(results, r.seconds, extra={"keys": [x.key for x in r.results]})

    return Workload("shared_prompt", run)


def flush(srv: SGLangServer) -> None:
    status, body = srv.post("/flush_cache?timeout=60", timeout=90.0)
    if status != 200:
        raise RuntimeError(f"/flush_cache answered {status} (expected 200): {body[:200]}")


def run_server(name: str, pool: int, model: str, calibration: str, *, cfg: SessionBenchConfig,
               workloads: list[Workload]) -> dict[str, Any]:
    """Start one server, run every workload on it (flushed before each), stop it; per-workload summaries."""
    backend = "kvtc" if name == "kvtc" else "vanilla"
    bc = BenchConfig(max_total_tokens=pool, page_size=cfg.page_size, store_fraction=cfg.store_fraction,
                     idle_seconds=cfg.idle_seconds, start_timeout=cfg.start_timeout, out=cfg.out)
    extra = list(cfg.kvtc_flags) if backend == "kvtc" else []
    if name == "big" and cfg.big_max_running is not None:
        extra += ["--max-running-requests", str(cfg.big_max_running)]
    spec = server_spec(backend, model, calibration, bc, extra)
    logs = cfg.out / "logs"
    t0 = time.perf_counter()
    out: dict[str, Any] = {"workloads": {}, "raw": {}}
    with SGLangServer(spec, logs / f"server_{name}.log", start_timeout=cfg.start_timeout) as srv:
        out["startup_s"] = time.perf_counter() - t0
        print(f"[{name} @ {pool}] started in {out['startup_s']:.0f} s", flush=True)
        for wl in workloads:
            for w in range(cfg.warmup_runs):  # one-time costs (allocations, kernels for new shapes), not measured
                flush(srv)
                wl.run(srv, f"{name}_warmup{w + 1}", logs)
            runs, outcomes = [], []
            first: ServerCounters | None = None
            for rep in range(cfg.repeats):
                flush(srv)
                before = server_counters(srv.get("/metrics")[1])
                if first is None:
                    first = before
                outcome = wl.run(srv, name if rep == 0 else f"{name}_r{rep + 1}", logs)
                counters = server_counters(srv.get("/metrics")[1]).minus(before)
                runs.append(summarize(outcome.results, outcome.wall, counters, outcome.throughput))
                outcomes.append(outcome)
                print(f"[{name} @ {pool}] {wl.name}{f' run {rep + 1}' if cfg.repeats > 1 else ''}: "
                      f"{runs[-1]['requests']} requests, TTFT mean {runs[-1]['ttft_mean']:.2f} s, "
                      f"{runs[-1]['prefilled_tokens']} tokens prefilled, {outcome.wall:.0f} s", flush=True)
            total = server_counters(srv.get("/metrics")[1]).minus(first) if first is not None else None
            out["workloads"][wl.name] = pooled(outcomes, runs, total)
            out["raw"][wl.name] = {"requests": [{"run": i, **asdict(r)} for i, o in enumerate(outcomes)
                                                for r in o.results], **outcomes[0].extra}
        (logs / f"metrics_{name}.txt").write_text(srv.get("/metrics")[1])
    out["total_s"] = time.perf_counter() - t0
    return out


def pooled(outcomes: list[Outcome], runs: list[dict[str, Any]], counters: ServerCounters | None) -> dict[str, Any]:
    """One workload's summary over all its runs on one server: every run's requests together, the walls and
    counters summed (so token counts are totals over the runs), SGLang's throughput averaged; ``runs`` keeps
    each run's own summary."""
    throughputs = [o.throughput for o in outcomes if o.throughput is not None]
    summary = summarize([r for o in outcomes for r in o.results], sum(o.wall for o in outcomes), counters,
                        sum(throughputs) / len(throughputs) if throughputs else None)
    return {**summary, "runs": runs} if len(runs) > 1 else summary


def trace_sha256(trace: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(trace["conversations"], sort_keys=True).encode()).hexdigest()


def reusable(reuse: dict[str, Any] | None, name: str, pool: int, sha: str, *, gsp: dict | None,
             workloads: list[str], repeats: int = 1, big_max_running: int | None = None) -> dict[str, Any] | None:
    """``name``'s results from an earlier report with the same trace, pool, GSP sizes, workloads and repeats,
    or ``None``."""
    if reuse is None or name not in reuse.get("servers", {}) or reuse.get("trace_sha256") != sha:
        return None
    config = reuse.get("config", {})
    if str(config.get("repeats", 1)) != str(repeats):
        return None
    if name == "big" and str(config.get("big_max_running")) != str(big_max_running):
        return None
    if reuse["pools"].get(name) != pool or ("gsp" in workloads and reuse.get("gsp") != gsp):
        return None
    if not all(name in reuse["summaries"].get(w, {}) for w in workloads):
        return None
    return {**reuse["servers"][name], "workloads": {w: reuse["summaries"][w][name] for w in workloads},
            "reused_from": reuse.get("out", "?")}


def run_bench(model: str, calibration: str, trace_path: Path, trace: dict[str, Any], *, cfg: SessionBenchConfig,
              gsp: sglang_bench.GSPConfig | None = None, extra: list[Workload] | None = None,
              reuse: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every server of ``cfg.servers`` over the standard workloads plus ``extra``; writes report.{md,json}.

    ``reuse``: an earlier ``report.json``; a server it measured with the same trace, pool, GSP sizes and
    workloads is taken from it instead of being run again (e.g. only kvtc is re-run when its flags change).
    """
    pool = pools(cfg, trace, gsp)
    workloads = standard_workloads(cfg, model, trace_path, trace, gsp) + list(extra or [])
    sha = trace_sha256(trace)
    names = [wl.name for wl in workloads]
    servers = {}
    for name in cfg.servers:
        old = reusable(reuse, name, pool[name], sha, gsp=gsp and asdict(gsp), workloads=names, repeats=cfg.repeats,
                       big_max_running=cfg.big_max_running)
        if old is not None:
            print(f"[{name} @ {pool[name]}] reused from {old['reused_from']}", flush=True)
        servers[name] = old or run_server(name, pool[name], model, calibration, cfg=cfg, workloads=workloads)
    summaries = {wl.name: {n: servers[n]["workloads"][wl.name] for n in cfg.servers} for wl in workloads}
    report = {"config": {k: str(v) for k, v in asdict(cfg).items()}, "out": str(cfg.out), "pools": pool,
              "gsp": gsp and asdict(gsp), "trace": str(trace_path), "trace_sha256": sha,
              "trace_metadata": trace["metadata"], "summaries": summaries,
              "shares": {w: shares(s) for w, s in summaries.items()},
              "servers": {n: {k: v for k, v in s.items() if k != "workloads"} for n, s in servers.items()}}
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (cfg.out / "report.md").write_text(format_report(report) + "\n")
    return report


WORKLOAD_TITLES = {
    "serving": "agentic sessions, sglang.benchmark.serving (agentic-trace)",
    "gsp": "generated-shared-prefix, sglang.benchmark.serving (multi-turn)",
    "own": "agentic sessions, own openai-client replay",
    "shared_prompt": "shared system prompts (workload.run_shared_prompt), own openai client",
}


def format_report(report: dict[str, Any]) -> str:
    pools = report["pools"]
    meta = report["trace_metadata"]
    c = meta["config"]
    head = (f"Agentic trace: {c['sessions']} sessions x {c['turns']} turns (first read {c['first_read_tokens']} "
            f"tokens, tool outputs {c['tool_tokens']}, {c['output_tokens']} output tokens per turn, {c['concurrency']} "
            f"sessions in flight), {meta['estimated_prompt_tokens_total']} prompt tokens in all, final contexts "
            f"{meta['estimated_context_total']} tokens together; pools: N = {pools['vanilla']}, big = {pools['big']}.")
    parts = [head]
    for w, per_server in report["summaries"].items():
        parts.append(format_table(WORKLOAD_TITLES.get(w, w), per_server, pools))
    starts = ", ".join(f"{n} {s['startup_s']:.0f} s (total {s['total_s']:.0f} s"
                       f"{', reused from ' + s['reused_from'] if 'reused_from' in s else ''})"
                       for n, s in report["servers"].items())
    parts.append(f"\nserver start-up: {starts}")
    parts.append(f"\n{FOOTNOTE}")
    return "\n".join(parts)
