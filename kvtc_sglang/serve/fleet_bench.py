"""Off-GPU tiers across servers: two replicas behind SGLang's router, and a restart.

* ``fleet``: two replicas of one kind (``vanilla``: stock SGLang; ``kvtc``: kvtc with a host tier and a
  Mooncake L3 shared by both, one ``mooncake_master``, written through at commit; ``kvtc+wb``: the same with
  ``write_policy: write_back``, a chunk written only when its blobs leave the server) behind
  ``sglang_router.launch_router`` with a policy (``round_robin``: a session's next turn usually lands on the
  other replica; ``cache_aware``: the router keeps a session where its prefix is). Everything (master,
  replicas, router) starts fresh for each fleet and policy, so no run sees another's store.
* ``restart``: one server runs every session's first turn, is killed (after kvtc's L3 writes have settled)
  and started again; each session's next turn then goes to the fresh server. A fresh server's cache is empty:
  cached tokens on that turn came from the L3 directory (``kvtc+dir``; ``kvtc+dir+wb`` writes back), never
  from ``kvtc`` or ``vanilla``.

The workload is turn-major (:func:`run_turn`): all sessions' turn ``t`` (``concurrency`` in flight), then all
turn ``t + 1``, each session's history carrying the server's own answers. With an odd number of sessions a
round-robin router alternates each session between the replicas from one turn to the next.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .bench import BenchConfig, server_spec
from .bench_report import percentile
from .server import SGLangServer
from .server_metrics import ServerCounters, server_counters
from .session_replay import Message, ReplayConfig, TurnResult, stream_chat

AIM_FLEET_RATIO = 0.4  # kvtc + Mooncake under round robin prefills at most this share of vanilla's tokens
L3_KEYS = ("l3_put_objects_total", "l3_put_bytes_total", "l3_hits_total", "l3_hit_tokens_total", "l3_parked_total",
           "l3_rejected_total", "l3_get_seconds_total", "l3_get_objects_total", "l3_get_errors_total",
           "l3_prefetch_timeouts_total", "host_hit_tokens_total", "restored_tokens_total")


@dataclass(frozen=True)
class FleetConfig:
    pool: int = 2560
    kvtc_flags: tuple[str, ...] = ("--kvtc-store-fraction", "0.05", "--kvtc-window-tokens", "64")
    host_bytes: str = "256M"
    chunk_tokens: int = 256
    concurrency: int = 2
    output_tokens: int = 16
    distinct_system: bool = False
    settle_s: float = 20.0  # restart: wait at most this long for kvtc's L3 writes to stop before the kill
    start_timeout: float = 400.0
    timeout: float = 600.0
    out: Path = Path("out/fleet")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:  # noqa: S310 (127.0.0.1 only)
            return r.status == 200
    except OSError:
        return False


class Proc:
    """A helper process (Mooncake master or router) in its own process group, logged to a file."""

    def __init__(self, cmd: list[str], log: Path, ready: str, timeout: float = 120.0) -> None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        end = time.monotonic() + timeout
        while not _ready(ready):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"{cmd[0]} not ready at {ready} (see {log})")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _ready(what: str) -> bool:
    if what.startswith("http"):
        return _http_ok(what)
    host, port = what.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=0.5):
            return True
    except OSError:
        return False


def mooncake_master(log: Path) -> tuple[Proc, str]:
    binary = Path(sys.executable).parent / "mooncake_master"
    port, metrics = _port(), _port()
    cmd = [str(binary), "--rpc_port", str(port), "--rpc_address", "127.0.0.1", "--rpc_thread_num", "2",
           "--metrics_port", str(metrics), "--metrics_host", "127.0.0.1", "--enable_metric_reporting=false"]
    return Proc(cmd, log, f"127.0.0.1:{port}", 30.0), f"127.0.0.1:{port}"


def router(urls: list[str], policy: str, log: Path) -> tuple[Proc, str]:
    port = _port()
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--worker-urls", *urls, "--policy", policy,
           "--health-check-timeout-secs", "120", "--health-failure-threshold", "1000"]  # a busy CPU answers late
    url = f"http://127.0.0.1:{port}"
    return Proc(cmd, log, url + "/readiness"), url  # the router's own answer: no request moves round robin


def server_flags(kind: str, cfg: FleetConfig, l3: tuple[str, dict[str, Any]] | None = None) -> list[str]:
    """A server's flags: ``vanilla`` none; ``kvtc...`` the kvtc flags, and with ``l3`` a host tier and the L3
    (written back when ``kind`` ends in ``+wb``)."""
    if kind == "vanilla":
        return []
    flags = list(cfg.kvtc_flags)
    if l3 is not None:
        conf = {**l3[1], "chunk_tokens": cfg.chunk_tokens}
        if kind.endswith("+wb"):
            conf["write_policy"] = "write_back"
        flags += ["--kvtc-host-bytes", cfg.host_bytes, "--kvtc-l3", l3[0], "--kvtc-l3-config", json.dumps(conf)]
    return flags


def start_servers(kind: str, flags: list[str], model: str, calibration: str, *, cfg: FleetConfig,
                  logs: list[Path]) -> list[SGLangServer]:
    """``n`` servers started at once (each waits for its own /health); all stopped if one fails."""
    bc = BenchConfig(max_total_tokens=cfg.pool, start_timeout=cfg.start_timeout, out=cfg.out)
    kind = "vanilla" if kind == "vanilla" else "kvtc"
    servers = [SGLangServer(server_spec(kind, model, calibration, bc, flags), log, start_timeout=cfg.start_timeout)
               for log in logs]
    with ThreadPoolExecutor(len(servers)) as ex:
        futures = [ex.submit(s.start) for s in servers]
        errors = [f.exception() for f in futures]
    if any(errors):
        for s in servers:
            s.stop()
        raise next(e for e in errors if e is not None)
    return servers


# ----- the workload -----


def conversations(trace: dict[str, Any], distinct_system: bool = False) -> list[list[list[Message]]]:
    """Per session, per turn: the turn's new messages (role and content only). ``distinct_system``: each session's
    system prompt starts with its own number (``"3. You are ..."``), so sessions share only the template's first
    3 tokens, fewer than kvtc's 4 sinks, instead of the whole system prompt."""
    out = [[[{"role": m["role"], "content": m["content"]} for m in t["messages"]] for t in conv if t.get("messages")]
           for conv in trace["conversations"]]
    if distinct_system:
        for s, conv in enumerate(out):
            for m in conv[0]:
                if m["role"] == "system":
                    m["content"] = f"{s}. {m['content']}"
    return out


def run_turn(url: str, convs: list[list[list[Message]]], histories: list[list[Message]], t: int,
             cfg: FleetConfig) -> list[TurnResult]:
    """Every session's turn ``t`` against ``url`` (``cfg.concurrency`` in flight, session order); the answers are
    appended to ``histories``."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=cfg.timeout)
    rc = ReplayConfig(concurrency=cfg.concurrency, output_tokens=cfg.output_tokens, timeout=cfg.timeout)

    def one(s: int) -> TurnResult:
        histories[s] += convs[s][t]
        r = TurnResult(s, t)
        stream_chat(client, "default", list(histories[s]), rc, r)
        histories[s].append({"role": "assistant", "content": r.text})
        return r

    with ThreadPoolExecutor(cfg.concurrency) as ex:
        return list(ex.map(one, [s for s in range(len(convs)) if t < len(convs[s])]))


def flush(srv: SGLangServer) -> None:
    status, body = srv.post("/flush_cache?timeout=60", timeout=90.0)
    if status != 200:
        raise RuntimeError(f"/flush_cache answered {status} (expected 200): {body[:200]}")


def counters(servers: list[SGLangServer]) -> list[ServerCounters]:
    return [server_counters(s.get("/metrics")[1]) for s in servers]


def settle(srv: SGLangServer, max_s: float, quiet_s: float = 4.0) -> float:
    """Wait until ``l3_put_objects_total`` has not moved for ``quiet_s`` (at most ``max_s``); its final value."""
    end, last, since = time.monotonic() + max_s, -1.0, time.monotonic()
    while True:
        now = server_counters(srv.get("/metrics")[1]).kvtc.get("l3_put_objects_total", 0.0)
        if now != last:
            last, since = now, time.monotonic()
        if time.monotonic() - since >= quiet_s or time.monotonic() > end:
            return last
        time.sleep(1.0)


# ----- summaries -----


def summarize(results: list[TurnResult], before: list[ServerCounters], after: list[ServerCounters],
              wall: float) -> dict[str, Any]:
    """Tokens prefilled (usage and the replicas' counters), TTFT, kvtc's L3/host counters summed over replicas."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    deltas = [a.minus(b) for a, b in zip(after, before, strict=True)]
    prefill = [d.prefill_tokens for d in deltas]
    return {
        "requests": len(results), "errors": len(results) - len(ok),
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "cached_tokens": sum(r.cached_tokens for r in ok),
        "prefilled_tokens": sum(r.prompt_tokens - r.cached_tokens for r in ok),
        "server_prefill_tokens": None if None in prefill else sum(p or 0.0 for p in prefill),
        "server_prefill_per_replica": prefill,
        "ttft_mean": sum(ttft) / len(ttft) if ttft else 0.0, "ttft_p90": percentile(ttft, 90),
        "ttft_per_turn": _per_turn(ok), "wall_s": wall,
        "kvtc": {k: sum(d.kvtc.get(k, 0.0) for d in deltas) for k in L3_KEYS} if any(d.kvtc for d in deltas) else {},
    }


def _per_turn(results: list[TurnResult]) -> list[float]:
    turns: dict[int, list[float]] = {}
    for r in results:
        turns.setdefault(r.turn, []).append(r.ttft)
    return [sum(v) / len(v) for _, v in sorted(turns.items())]


def resumed(results: list[TurnResult], chunk_tokens: int = 256) -> list[dict[str, Any]]:
    """Per resumed session: restored (at least one whole chunk cached on a fresh server: the few template tokens
    every session shares are cached from another session's turn), prompt, cached, prefilled, TTFT."""
    return [{"session": r.session, "restored": r.ok and r.cached_tokens >= chunk_tokens,
             "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens,
             "prefilled_tokens": r.prompt_tokens - r.cached_tokens, "ttft": r.ttft, "error": r.error} for r in results]


def fleet_aim(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """kvtc + Mooncake under round robin prefills <= AIM_FLEET_RATIO x vanilla's tokens (usage)."""
    v, k = summaries.get("vanilla/round_robin"), summaries.get("kvtc/round_robin")
    if not v or not k or not v["prefilled_tokens"]:
        return {"met": None, "ratio": None, "text": "not measured"}
    ratio = k["prefilled_tokens"] / v["prefilled_tokens"]
    met = ratio <= AIM_FLEET_RATIO and not k["errors"]
    return {"met": met, "ratio": ratio, "text": f"{'met' if met else 'not met'} ({ratio:.2f}x)"}


def restart_aim(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    n = sum(1 for s in sessions if s["restored"])
    return {"met": bool(sessions) and n == len(sessions), "restored": n, "sessions": len(sessions),
            "text": f"{'met' if sessions and n == len(sessions) else 'not met'} ({n}/{len(sessions)} restored)"}


def _n(x: float | None, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def fleet_table(summaries: dict[str, dict[str, Any]]) -> str:
    cols = list(summaries)
    rows = [
        ("requests (errors)", lambda s: f"{s['requests']} ({s['errors']})"),
        ("prompt / cached tokens (usage)", lambda s: f"{s['prompt_tokens']} / {s['cached_tokens']}"),
        ("**tokens prefilled** (prompt - cached)", lambda s: f"**{s['prefilled_tokens']}**"),
        ("tokens prefilled (replicas' counters, A + B)", lambda s: f"{_n(s['server_prefill_tokens'])} ("
         + " + ".join(_n(p) for p in s["server_prefill_per_replica"]) + ")"),
        ("TTFT mean / p90 (s)", lambda s: f"{s['ttft_mean']:.2f} / {s['ttft_p90']:.2f}"),
        ("TTFT per turn (s)", lambda s: ", ".join(f"{x:.2f}" for x in s["ttft_per_turn"])),
        ("L3 puts (MiB) / hits / hit tokens", lambda s: "-" if not s["kvtc"] else
         f"{_n(s['kvtc']['l3_put_objects_total'])} ({_n(s['kvtc'].get('l3_put_bytes_total', 0) / 2**20, '.1f')}) / "
         f"{_n(s['kvtc']['l3_hits_total'])} / {_n(s['kvtc']['l3_hit_tokens_total'])}"),
        ("L3 parked / rejected / get s", lambda s: "-" if not s["kvtc"] else
         f"{_n(s['kvtc']['l3_parked_total'])} / {_n(s['kvtc']['l3_rejected_total'])} / "
         f"{_n(s['kvtc']['l3_get_seconds_total'], '.2f')}"),
        ("L3 objects fetched / get errors / prefetch timeouts", lambda s: "-" if not s["kvtc"] else
         f"{_n(s['kvtc']['l3_get_objects_total'])} / {_n(s['kvtc']['l3_get_errors_total'])} / "
         f"{_n(s['kvtc']['l3_prefetch_timeouts_total'])}"),
        ("kvtc restored / host-hit tokens", lambda s: "-" if not s["kvtc"] else
         f"{_n(s['kvtc']['restored_tokens_total'])} / {_n(s['kvtc']['host_hit_tokens_total'])}"),
        ("workload wall (s)", lambda s: f"{s['wall_s']:.0f}"),
    ]
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(fn(summaries[c]) for c in cols) + " |" for label, fn in rows]
    return "\n".join(lines)


def restart_table(runs: dict[str, dict[str, Any]]) -> str:
    """One row per resumed session: ``restored? cached/prompt, TTFT`` per server; totals last."""
    cols = list(runs)
    lines = ["| session | " + " | ".join(f"{c}: cached / prompt, TTFT" for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for i in range(max((len(r["resumed"]) for r in runs.values()), default=0)):
        cells = []
        for c in cols:
            s = runs[c]["resumed"][i] if i < len(runs[c]["resumed"]) else None
            cells.append("-" if s is None else f"{'restored' if s['restored'] else 'prefilled'} {s['cached_tokens']}"
                         f" / {s['prompt_tokens']}, {s['ttft']:.2f} s")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    tot = [f"{sum(s['prefilled_tokens'] for s in runs[c]['resumed'])} prefilled, TTFT mean "
           f"{runs[c]['next']['ttft_mean']:.2f} s" for c in cols]
    lines.append("| all | " + " | ".join(tot) + " |")
    return "\n".join(lines)


def save(out: Path, name: str, report: dict[str, Any], text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(text + "\n")


def config_dict(cfg: FleetConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


# ----- the two runs -----


def run_fleet(kind: str, policies: list[str], trace: dict[str, Any], model: str, calibration: str, *,
              cfg: FleetConfig) -> dict[str, dict[str, Any]]:
    """``{policy: summary}``. kvtc: a fresh master and replicas per policy (no run sees another's store);
    vanilla: the same replicas for every policy, their caches flushed before each."""
    if kind != "vanilla":
        return {p: _fleet(kind, [p], trace, model, calibration, cfg=cfg)[p] for p in policies}
    return _fleet(kind, policies, trace, model, calibration, cfg=cfg)


def _fleet(kind: str, policies: list[str], trace: dict[str, Any], model: str, calibration: str, *,
           cfg: FleetConfig) -> dict[str, dict[str, Any]]:
    """Master (kvtc), two replicas; per policy a router and the whole trace turn-major through it; all stopped."""
    logs = cfg.out / "logs"
    tag = f"{kind.replace('+', '_')}_{'_'.join(policies)}"
    master: Proc | None = None
    servers: list[SGLangServer] = []
    out: dict[str, dict[str, Any]] = {}
    try:
        l3 = None
        if kind != "vanilla":
            master, address = mooncake_master(logs / f"mooncake_{tag}.log")
            l3 = ("mooncake", {"master_server_address": address, "global_segment_size": "256mb",
                               "local_buffer_size": "64mb"})
        t0 = time.perf_counter()
        servers = start_servers(kind, server_flags(kind, cfg, l3), model, calibration, cfg=cfg,
                                logs=[logs / f"server_{tag}_{r}.log" for r in "AB"])
        print(f"[{tag}] replicas up in {time.perf_counter() - t0:.0f} s", flush=True)
        for policy in policies:
            out[policy] = _through_router(servers, kind, policy, trace, cfg)
    finally:
        for srv in servers:
            srv.stop()
        if master is not None:
            master.stop()
    return out


def _through_router(servers: list[SGLangServer], kind: str, policy: str, trace: dict[str, Any],
                    cfg: FleetConfig) -> dict[str, Any]:
    logs, tag = cfg.out / "logs", f"{kind.replace('+', '_')}_{policy}"
    for srv in servers:
        flush(srv)
    rt, url = router([s.url for s in servers], policy, logs / f"router_{tag}.log")
    try:
        convs = conversations(trace, cfg.distinct_system)
        histories: list[list[Message]] = [[] for _ in convs]
        before, results, t0 = counters(servers), [], time.perf_counter()
        for t in range(max(map(len, convs))):
            results += run_turn(url, convs, histories, t, cfg)
        wall = time.perf_counter() - t0
    finally:
        rt.stop()
    s = summarize(results, before, counters(servers), wall)
    for srv, r in zip(servers, "AB", strict=True):
        (logs / f"metrics_{tag}_{r}.txt").write_text(srv.get("/metrics")[1])
    print(f"[{tag}] {s['requests']} requests ({s['errors']} errors), {s['prefilled_tokens']} tokens prefilled, "
          f"TTFT mean {s['ttft_mean']:.2f} s, L3 {s['kvtc'] or '-'}, {wall:.0f} s", flush=True)
    return {**s, "requests_raw": [asdict(r) for r in results]}


def run_restart(name: str, trace: dict[str, Any], model: str, calibration: str, *,
                cfg: FleetConfig) -> dict[str, Any]:
    """First turns on one server, kill, a fresh server (same L3 directory for ``kvtc+dir``), the next turns."""
    logs = cfg.out / "logs"
    kind = "vanilla" if name == "vanilla" else "kvtc"
    directory = cfg.out / "l3_dir"
    shutil.rmtree(directory, ignore_errors=True)  # nothing from an earlier run
    l3 = ("directory", {"path": str(directory)}) if name.startswith("kvtc+dir") else None
    flags = server_flags(name, cfg, l3)
    tag = name.replace("+", "_")
    convs = conversations(trace, cfg.distinct_system)
    histories: list[list[Message]] = [[] for _ in convs]
    phases: dict[str, Any] = {}
    for phase, turn in (("first", 0), ("next", 1)):
        srv = start_servers(kind, flags, model, calibration, cfg=cfg, logs=[logs / f"restart_{tag}_{phase}.log"])[0]
        try:
            before, t0 = counters([srv]), time.perf_counter()
            results = run_turn(srv.url, convs, histories, turn, cfg)
            wall = time.perf_counter() - t0
            puts = settle(srv, cfg.settle_s) if l3 is not None and phase == "first" else None
            phases[phase] = {**summarize(results, before, counters([srv]), wall), "settled_puts": puts,
                             "requests_raw": [asdict(r) for r in results]}
            (logs / f"metrics_restart_{tag}_{phase}.txt").write_text(srv.get("/metrics")[1])
        finally:
            srv.stop()
        print(f"[restart {name}] {phase} turns: {phases[phase]['prefilled_tokens']} tokens prefilled, "
              f"cached {phases[phase]['cached_tokens']}, L3 {phases[phase]['kvtc'] or '-'}", flush=True)
    files = sorted(p for p in directory.rglob("*") if p.is_file()) if l3 is not None and directory.exists() else []
    return {**phases, "resumed": resumed([TurnResult(**r) for r in phases["next"]["requests_raw"]], cfg.chunk_tokens),
            "l3_files": len(files), "l3_bytes": sum(p.stat().st_size for p in files)}
