"""Long-context coding-agent sessions on three real SGLang servers: vanilla and kvtc at ``--max-total-tokens N``,
vanilla at a pool that holds everything (the upper bound of any prefix cache), one at a time.

    python benchmarks/agentic_bench.py --sessions 6 --turns 4 --max-total-tokens 8192 \
        --workloads serving own --out out/agentic --plot benchmarks/figures/agentic_ttft_per_turn.png
    python benchmarks/agentic_bench.py --trace-only --out out/agentic     # just write out/agentic/trace.json

Any ``--kvtc-*`` flag not listed below goes to the kvtc server unchanged (``--kvtc-window-tokens 64``...).
Writes ``trace.json``, ``report.md``, ``report.json`` and the server/benchmark logs into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from kvtc_sglang.calibration.fit import artifact_name
from kvtc_sglang.calibration.model import DEFAULT_MODEL
from kvtc_sglang.serve.bench_report import SERVERS, plot_ttft_per_turn
from kvtc_sglang.serve.session_bench import WORKLOADS, SessionBenchConfig, format_report, run_bench
from kvtc_sglang.serve.sessions import TraceConfig, add_trace_arguments, trace_config, write_trace
from kvtc_sglang.serve.sglang_bench import GSPConfig


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--model", default=None, help="HF model directory (default: the exported SmolLM2)")
    p.add_argument("--calibration", type=Path, default=None, help="kvtc artifact (default: the r16 one)")
    add_trace_arguments(p.add_argument_group("trace"), TraceConfig(), "sessions in flight at once")
    g = p.add_argument_group("servers")
    g.add_argument("--max-total-tokens", type=int, default=8192, help="N, the pool of vanilla and kvtc")
    g.add_argument("--big-pool", type=int, default=None, help="pool of the upper-bound server (default: all fits)")
    g.add_argument("--page-size", type=int, default=1)
    g.add_argument("--store-fraction", type=float, default=0.25)
    g.add_argument("--idle-seconds", type=float, default=None, help="default: kvtc's own (0)")
    g.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    g.add_argument("--repeats", type=int, default=1, help="runs of each workload per server (pooled, spread shown)")
    g.add_argument("--big-max-running", type=int, default=None,
                   help="--max-running-requests of the big-pool server only: the caching gain without more concurrency")
    g.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=["serving", "own"])
    g = p.add_argument_group("generated-shared-prefix (workload gsp)")
    g.add_argument("--gsp-groups", type=int, default=4)
    g.add_argument("--gsp-prompts-per-group", type=int, default=2)
    g.add_argument("--gsp-system-tokens", type=int, default=1500)
    g.add_argument("--gsp-question-tokens", type=int, default=64)
    g.add_argument("--gsp-output-tokens", type=int, default=16)
    g.add_argument("--gsp-turns", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("out/agentic"))
    p.add_argument("--plot", type=Path, default=None, help="write the TTFT-per-turn plot here (PNG)")
    p.add_argument("--trace-only", action="store_true", help="write the trace and stop")
    p.add_argument("--from-report", type=Path, default=None,
                   help="only re-render report.md (next to it) and --plot from this report.json; no server runs")
    p.add_argument("--reuse", type=Path, default=None,
                   help="an earlier report.json: servers it measured on the same trace and pool are not run again")
    args, rest = p.parse_known_args(argv)
    bad = [a for a in rest if a.startswith("-") and not a.startswith("--kvtc-")]
    if bad:
        p.error(f"unrecognized arguments (only --kvtc-* flags pass through to the kvtc server): {' '.join(bad)}")
    return args, rest


def finish(report: dict, plot: Path | None) -> None:
    print(format_report(report))
    if plot is not None:
        model = Path(report["trace_metadata"].get("tokenizer", "SmolLM2-135M")).name  # the served model's folder
        title = f"{model}, SGLang 0.5.23 (CPU): N = {report['pools']['vanilla']}, big pool {report['pools']['big']}"
        print(f"plot: {plot_ttft_per_turn(report['summaries'], report['pools'], plot, title)}")


def main(argv: list[str] | None = None) -> int:
    args, kvtc_flags = parse(argv)
    if args.from_report is not None:
        report = json.loads(args.from_report.read_text())
        (args.from_report.parent / "report.md").write_text(format_report(report) + "\n")
        finish(report, args.plot)
        return 0
    model = args.model
    if model is None:
        from kvtc_sglang.serve.export import export_default_model

        model = str(export_default_model(args.artifacts / "hf" / DEFAULT_MODEL))
    tc = trace_config(args)
    trace_path = args.out / "trace.json"
    trace = write_trace(tc, model, trace_path)
    meta = trace["metadata"]
    print(f"trace: {trace_path} ({tc.sessions} sessions, {meta['estimated_prompt_tokens_total']} prompt tokens, "
          f"final contexts {meta['estimated_context_total']} tokens together)", flush=True)
    if args.trace_only:
        return 0
    calibration = args.calibration or args.artifacts / artifact_name(DEFAULT_MODEL, 16)
    if "kvtc" in args.servers and not Path(calibration).is_file():
        raise SystemExit(f"agentic_bench: error: kvtc calibration {calibration} does not exist")
    cfg = SessionBenchConfig(max_total_tokens=args.max_total_tokens, big_pool=args.big_pool, page_size=args.page_size,
                             store_fraction=args.store_fraction, idle_seconds=args.idle_seconds,
                             kvtc_flags=tuple(kvtc_flags), servers=tuple(args.servers),
                             workloads=tuple(args.workloads), repeats=args.repeats,
                             big_max_running=args.big_max_running, out=args.out)
    gsp = GSPConfig(groups=args.gsp_groups, prompts_per_group=args.gsp_prompts_per_group,
                    system_prompt_tokens=args.gsp_system_tokens, question_tokens=args.gsp_question_tokens,
                    output_tokens=args.gsp_output_tokens, turns=args.gsp_turns, concurrency=args.concurrency,
                    seed=args.seed)
    reuse = json.loads(args.reuse.read_text()) if args.reuse is not None else None
    report = run_bench(model, str(calibration), trace_path, trace, cfg=cfg, gsp=gsp, reuse=reuse)
    finish(report, args.plot)
    print(f"(report.md, report.json and logs in {args.out}/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
