"""Off-GPU tiers across servers: two replicas behind SGLang's router (vanilla x2 against kvtc x2 sharing one Mooncake
master; round_robin and cache_aware), and a restart (kvtc with an L3 directory against kvtc without one and vanilla).

    python benchmarks/fleet_bench.py --calibration ART --out out/fleet --results benchmarks/results/fleet_bench_cpu
    python benchmarks/fleet_bench.py --parts restart --restart-sessions 2 --out out/fleet_smoke   # a small one

Any ``--kvtc-*`` flag not listed here goes to every kvtc server (default: ``--kvtc-store-fraction 0.05
--kvtc-window-tokens 64``, the pressure of the tier tests). Writes ``report.{md,json}``, the traces, every
server's, router's and master's log and final ``/metrics`` into ``--out`` (``--results PREFIX``: the report too).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from kvtc_sglang.calibration.fit import artifact_name
from kvtc_sglang.calibration.model import DEFAULT_MODEL
from kvtc_sglang.serve import fleet_bench as fb
from kvtc_sglang.serve import fleet_report as fr
from kvtc_sglang.serve.session_replay import TurnResult
from kvtc_sglang.serve.sessions import TraceConfig, add_trace_arguments, trace_config, write_trace


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--calibration", type=Path, default=None, help="kvtc artifact (default: the r16 one)")
    p.add_argument("--parts", nargs="+", choices=("fleet", "restart"), default=["fleet", "restart"])
    p.add_argument("--fleets", nargs="+", choices=("vanilla", "kvtc", "kvtc+wb"), default=["vanilla", "kvtc"],
                   help="kvtc+wb: the L3 written back (when blobs leave a server) instead of through (at commit)")
    p.add_argument("--policies", nargs="+", choices=("round_robin", "cache_aware"),
                   default=["round_robin", "cache_aware"])
    p.add_argument("--restart-servers", nargs="+", choices=("vanilla", "kvtc", "kvtc+dir", "kvtc+dir+wb"),
                   default=["kvtc+dir", "kvtc", "vanilla"])
    add_trace_arguments(p, TraceConfig(sessions=7, turns=3, first_read_tokens=(1000, 1500), tool_tokens=(150, 250),
                                       output_tokens=16, concurrency=2))  # --sessions odd: round robin alternates
    p.add_argument("--restart-sessions", type=int, default=6)
    p.add_argument("--distinct-system-prompts", action="store_true",
                   help="each session's system prompt starts with its own number (see fleet_bench.conversations)")
    p.add_argument("--pool", type=int, default=2560, help="--max-total-tokens of every server")
    p.add_argument("--host-bytes", default="256M")
    p.add_argument("--chunk-tokens", type=int, default=128, help="the L3's chunk_tokens (a multiple of the page)")
    p.add_argument("--out", type=Path, default=Path("out/fleet"))
    p.add_argument("--from-report", type=Path, default=None,
                   help="only re-render this report.json (and --results); no server runs")
    p.add_argument("--results", type=Path, default=None, help="also write the report to PREFIX.md and PREFIX.json")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-") and not a.startswith("--kvtc-")]
    if bad:
        p.error(f"unrecognized arguments (only --kvtc-* flags pass through to the kvtc servers): {' '.join(bad)}")
    return args, rest


def provenance() -> dict[str, str]:
    def sh(cmd: str) -> str:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, check=False).stdout.strip()

    dirty = sh("git status --short --untracked-files=no | wc -l")
    return {"date": sh("date -u"), "commit": sh("git rev-parse --short HEAD") + f" (+{dirty} modified tracked files)",
            "cpu": sh("lscpu | grep 'Model name'").split(":", 1)[-1].strip(), "cores": sh("nproc")}


def trace_for(args: argparse.Namespace, model: str, sessions: int, turns: int, path: Path) -> dict:
    tc = trace_config(args, sessions=sessions, turns=turns)
    return write_trace(tc, model, path)


def render(report: dict) -> str:
    """The markdown of a report (its aims and per-session restore verdicts recomputed from the raw requests)."""
    text = [f"{report['provenance']}\n"]
    if "fleet" in report:
        fleets = report["fleet"]
        report["fleet_aim"] = fr.fleet_aim(fleets)
        c = report["fleet_trace"]["config"]
        text += [f"### Two replicas behind sglang-router ({c['sessions']} sessions x {c['turns']} turns, first reads "
                 f"{c['first_read_tokens']}, tool outputs {c['tool_tokens']}, {c['output_tokens']} output tokens, "
                 f"concurrency {c['concurrency']}, turn-major; pool {report['config']['pool']} per replica)\n",
                 fr.fleet_table(fleets),
                 f"\nAim: kvtc + Mooncake under round robin prefills <= {fr.AIM_FLEET_RATIO}x vanilla's tokens: "
                 f"**{report['fleet_aim']['text']}**\n"]
    if "restart" in report:
        runs = report["restart"]
        chunk = report["config"]["chunk_tokens"]
        for r in runs.values():
            r["resumed"] = fr.resumed([TurnResult(**x) for x in r["next"]["requests_raw"]], chunk)
        text += [f"### A restart ({report['restart_trace']['config']['sessions']} sessions: first turns, kill, fresh "
                 f"server, next turns; pool {report['config']['pool']}; restored: >= {chunk} cached tokens)\n",
                 fr.restart_table(runs)]
        for name in [n for n in runs if n.startswith("kvtc+dir")]:
            d = runs[name]
            first = d["first"]["kvtc"]
            text += [f"\n{name} before the kill: {first.get('l3_put_objects_total', 0):.0f} chunk objects put "
                     f"(settled count {d['first']['settled_puts']}), {d['l3_files']} files / "
                     f"{d['l3_bytes'] / 2**20:.1f} MiB in the directory at the end; after the restart: "
                     f"{d['next']['kvtc'].get('l3_hits_total', 0):.0f} L3 hits, "
                     f"{d['next']['kvtc'].get('l3_hit_tokens_total', 0):.0f} hit tokens."]
        if "kvtc+dir" in runs:
            report["restart_aim"] = fr.restart_aim(runs["kvtc+dir"]["resumed"])
            text += [f"\nAim: every resumed session's next turn restores: **{report['restart_aim']['text']}**"]
    return "\n".join(text)


def finish(report: dict, out: Path, results: Path | None) -> None:
    body = render(report)
    fr.save(out, "report", report, body)
    if results is not None:
        fr.save(results.parent, results.name, report, body)
    print(body)


def main(argv: list[str] | None = None) -> int:
    args, kvtc_flags = parse(argv)
    if args.from_report is not None:
        finish(json.loads(args.from_report.read_text()), args.from_report.parent, args.results)
        return 0
    from kvtc_sglang.serve.export import export_default_model

    model = str(export_default_model(args.artifacts / "hf" / DEFAULT_MODEL))
    calibration = str(args.calibration or args.artifacts / artifact_name(DEFAULT_MODEL, 16))
    if not Path(calibration).is_file():
        raise SystemExit(f"fleet_bench: error: kvtc calibration {calibration} does not exist")
    cfg = fb.FleetConfig(pool=args.pool, host_bytes=args.host_bytes, concurrency=args.concurrency,
                         output_tokens=args.output_tokens, out=args.out, chunk_tokens=args.chunk_tokens,
                         distinct_system=args.distinct_system_prompts)
    if kvtc_flags:
        cfg = replace(cfg, kvtc_flags=tuple(kvtc_flags))
    report: dict = {"provenance": provenance(), "config": fb.config_dict(cfg), "argv": sys.argv[1:],
                    "calibration": calibration}
    t0 = time.perf_counter()
    if "fleet" in args.parts:
        trace = trace_for(args, model, args.sessions, args.turns, args.out / "trace_fleet.json")
        report["fleet_trace"] = trace["metadata"]
        runs = {k: fb.run_fleet(k, args.policies, trace, model, calibration, cfg=cfg) for k in args.fleets}
        report["fleet"] = {f"{k}/{p}": runs[k][p] for p in args.policies for k in args.fleets}
        fr.save(args.out, "report", report, render(report))  # kept if the restart part fails
    if "restart" in args.parts:
        trace = trace_for(args, model, args.restart_sessions, 2, args.out / "trace_restart.json")
        report["restart_trace"] = trace["metadata"]
        report["restart"] = {n: fb.run_restart(n, trace, model, calibration, cfg=cfg) for n in args.restart_servers}
    report["total_s"] = time.perf_counter() - t0
    finish(report, args.out, args.results)
    print(f"(report and logs in {args.out}/, {report['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
