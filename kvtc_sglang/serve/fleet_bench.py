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
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .bench import BenchConfig, server_spec
from .fleet_procs import Proc, mooncake_master, router
from .fleet_report import resumed, summarize
from .server import SGLangServer
from .server_metrics import ServerCounters, server_counters
from .session_replay import Message, ReplayConfig, TurnResult, stream_chat


@dataclass(frozen=True)
class FleetConfig:
    pool: int = 2560
    kvtc_flags: tuple[str, ...] = ("--kvtc-store-fraction", "0.05", "--kvtc-window-tokens", "64")
    host_bytes: str = "256M"
    chunk_tokens: int = 128
    concurrency: int = 2
    output_tokens: int = 16
    distinct_system: bool = False
    settle_s: float = 20.0  # restart: wait at most this long for kvtc's L3 writes to stop before the kill
    start_timeout: float = 400.0
    timeout: float = 600.0
    out: Path = Path("out/fleet")



def config_dict(cfg: FleetConfig) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}


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
