"""Many agents with a host tier: vanilla, kvtc (in-pool), kvtc+host, raw+host at ``--max-total-tokens N`` and
vanilla at a pool for everything, one at a time, on one seeded agentic trace replayed turn-interleaved (every
agent's turn t before any agent's turn t+1, so sessions go cold between turns). One table, plus the aims.

    python benchmarks/tier_bench.py --sessions 14 --turns 3 --first-read-tokens 1200 1500 --tool-tokens 100 200 \
        --output-tokens 8 --concurrency 2 --max-total-tokens 2048 --out out/tier_bench
    python benchmarks/tier_bench.py --trace-only --out out/tier_bench     # the trace and the default H only

``--host-bytes`` takes one or more budgets (``96M``; a sweep runs kvtc+host and raw+host at each); default: a
sixth of the sessions' KV at raw size (the raw tier overflows, the compressed one does not). Writes
``trace.json``, ``report.md``, ``report.json`` and the server logs and final ``/metrics`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvtc_sglang.calibration.model import DEFAULT_MODEL
from kvtc_sglang.serve.launcher import bench_calibration
from kvtc_sglang.serve.sessions import TraceConfig, add_trace_arguments, trace_config, write_trace
from kvtc_sglang.serve.tier_bench import (
    TierBenchConfig,
    default_host_bytes,
    merge_reports,
    parse_bytes,
    raw_bytes_per_token,
    run_bench,
)
from kvtc_sglang.serve.tier_report import SERVERS, format_report, mib


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--model", default=None, help="HF model directory (default: the exported SmolLM2)")
    p.add_argument("--calibration", type=Path, default=None,
                   help="kvtc artifact (default: artifacts' full r16 one, else artifacts/t16384's)")
    add_trace_arguments(p.add_argument_group("trace"), TraceConfig(sessions=14, turns=3, first_read_tokens=(1200, 1500),
                                                                   tool_tokens=(100, 200), output_tokens=8,
                                                                   concurrency=2))  # fmt: skip
    g = p.add_argument_group("servers")
    g.add_argument("--max-total-tokens", type=int, default=2048, help="N, the pool of every server but big")
    g.add_argument("--big-pool", type=int, default=None, help="pool of the upper-bound server (default: all fits)")
    g.add_argument("--host-bytes", nargs="+", type=parse_bytes, default=None,
                   help="host budget(s) H of kvtc+host and raw+host (96M, 1G...; default: sessions' raw KV / 6)")
    g.add_argument("--store-fraction", type=float, default=0.125, help="kvtc's --kvtc-store-fraction")
    g.add_argument("--page-size", type=int, default=1)
    g.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    g.add_argument("--runs", type=int, default=1, help="repeat the whole table, runs interleaved; spread shown")
    p.add_argument("--out", type=Path, default=Path("out/tier_bench"))
    p.add_argument("--trace-only", action="store_true", help="write the trace, print the default H, stop")
    p.add_argument("--from-report", type=Path, default=None, help="only re-render report.md from this report.json")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="merge these report.json files (same trace; a later one's column wins) into --out; no runs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.from_report is not None:
        report = json.loads(args.from_report.read_text())
        text = format_report(report)
        (args.from_report.parent / "report.md").write_text(text + "\n")
        print(text)
        return 0
    if args.merge is not None:
        report = merge_reports([json.loads(p.read_text()) for p in args.merge])
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (args.out / "report.md").write_text(format_report(report) + "\n")
        print(format_report(report))
        return 0
    model = args.model
    if model is None:
        from kvtc_sglang.serve.export import export_default_model

        model = str(export_default_model(args.artifacts / "hf" / DEFAULT_MODEL))
    tc = trace_config(args)
    trace = write_trace(tc, model, args.out / "trace.json")
    meta = trace["metadata"]
    per_token = raw_bytes_per_token(model)
    host = tuple(args.host_bytes or (default_host_bytes(meta["estimated_context_total"], per_token),))
    print(f"trace: {args.out / 'trace.json'} ({tc.sessions} sessions, {meta['estimated_prompt_tokens_total']} prompt "
          f"tokens, final contexts {meta['estimated_context_total']} tokens together = "
          f"{meta['estimated_context_total'] * per_token / 2**20:.0f} MiB raw at {per_token} B/token); "
          f"H = {', '.join(mib(h) for h in host)}", flush=True)
    if args.trace_only:
        return 0
    calibration = bench_calibration(args.calibration, args.artifacts, args.servers, "tier_bench")
    cfg = TierBenchConfig(max_total_tokens=args.max_total_tokens, big_pool=args.big_pool, host_bytes=host,
                          servers=tuple(args.servers), page_size=args.page_size, store_fraction=args.store_fraction,
                          concurrency=args.concurrency, output_tokens=args.output_tokens, runs=args.runs,
                          out=args.out)
    report = run_bench(model, str(calibration), trace, cfg)
    print(format_report(report))
    print(f"(report.md, report.json and logs in {args.out}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
