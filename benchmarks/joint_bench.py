"""Joint encoding across requests, served: agents in different sessions read the SAME real files after DIFFERENT
histories (the same text at different token offsets in different radix branches). vanilla, kvtc and kvtc+joint
(kvtc with ``--kvtc-joint-calibration PATH``) at ``--max-total-tokens N``, and vanilla at a pool for everything,
one at a time, on one seeded trace replayed turn-major one request at a time (every session's read before any
follow-up question, so sessions go cold and come back from blobs). One table.

    python benchmarks/joint_bench.py --out out/joint_bench                      # vanilla, kvtc, big
    python benchmarks/joint_bench.py --joint-calibration J --runs 2             # kvtc+joint too
    python benchmarks/joint_bench.py --servers vanilla kvtc --sessions 4 --out out/joint_bench_smoke
    python benchmarks/joint_bench.py --trace-only                               # the trace and N only

``--max-total-tokens`` defaults to a pool whose raw slots hold about 1.5 of the largest session's context, and
``--store-fraction`` to 0.25: kvtc's store then holds every session compressed (the header says how many times the
sessions' KV the store holds), so the returns come back from blobs and joint encoding shows as bytes per compressed
token. At 0.125 (N = 3328) the 8 default sessions need ~1.85x the store: kvtc alone drops every blob before its
session returns (turn-major order is LRU's worst case), and joint encoding's saving decides whether they come back.
Writes ``trace.json``, ``report.md``, ``report.json`` and the server logs and final ``/metrics`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvtc_sglang.calibration.model import DEFAULT_MODEL
from kvtc_sglang.serve.joint_bench import SERVERS, default_pool, format_report, run_bench
from kvtc_sglang.serve.launcher import bench_calibration
from kvtc_sglang.serve.shared_files import SharedFilesConfig, make_shared_trace
from kvtc_sglang.serve.tier_bench import TierBenchConfig


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--model", default=None, help="HF model directory (default: the exported SmolLM2)")
    p.add_argument(
        "--calibration",
        type=Path,
        default=None,
        help="kvtc artifact (default: artifacts' full r16 one, else artifacts/t16384's)",
    )
    p.add_argument(
        "--joint-calibration",
        default=None,
        help="kvtc+joint's --kvtc-joint-calibration PATH (without it kvtc+joint is skipped)",
    )
    d = SharedFilesConfig()
    g = p.add_argument_group("trace")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--sessions", type=int, default=d.sessions)
    g.add_argument("--files", type=int, default=d.files, help="distinct shared files (session s reads s %% files)")
    g.add_argument("--file-tokens", type=int, default=d.file_tokens)
    g.add_argument("--history-tokens", type=int, nargs=2, default=d.history_tokens, metavar=("MIN", "MAX"))
    g.add_argument("--turns", type=int, default=d.turns, help="the read, then turns - 1 follow-up questions")
    g.add_argument("--output-tokens", type=int, default=d.output_tokens)
    g = p.add_argument_group("servers")
    g.add_argument(
        "--max-total-tokens",
        type=int,
        default=None,
        help="N, the pool of every server but big (default: raw slots for ~1.5 sessions)",
    )
    g.add_argument("--big-pool", type=int, default=None, help="pool of the upper-bound server (default: all fits)")
    g.add_argument(
        "--store-fraction",
        type=float,
        default=0.25,
        help="kvtc's --kvtc-store-fraction (default: room for every session compressed without joint encoding; "
        "smaller: a store too small for kvtc alone, where joint encoding's bytes decide what comes back)",
    )
    g.add_argument("--page-size", type=int, default=1)
    g.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    g.add_argument("--runs", type=int, default=1, help="repeat the whole table, runs interleaved")
    p.add_argument("--out", type=Path, default=Path("out/joint_bench"))
    p.add_argument("--trace-only", action="store_true", help="write the trace, print N, stop")
    p.add_argument("--from-report", type=Path, default=None, help="only re-render report.md from this report.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.from_report is not None:
        text = format_report(json.loads(args.from_report.read_text()))
        (args.from_report.parent / "report.md").write_text(text + "\n")
        print(text)
        return 0
    t0 = time.perf_counter()
    model = args.model
    if model is None:
        from kvtc_sglang.serve.export import export_default_model

        model = str(export_default_model(args.artifacts / "hf" / DEFAULT_MODEL))
    tc = SharedFilesConfig(
        seed=args.seed,
        sessions=args.sessions,
        files=args.files,
        file_tokens=args.file_tokens,
        history_tokens=tuple(args.history_tokens),
        turns=args.turns,
        output_tokens=args.output_tokens,
    )
    trace = make_shared_trace(tc, model)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trace.json").write_text(json.dumps(trace, indent=1) + "\n")
    meta = trace["metadata"]
    pool = args.max_total_tokens or default_pool(trace, args.store_fraction)
    print(
        f"trace: {args.out / 'trace.json'} ({tc.sessions} sessions reading {tc.files} files, "
        f"{meta['estimated_prompt_tokens_total']} prompt tokens, final contexts {meta['estimated_context_total']} "
        f"tokens together, {meta['shared_block_tokens_repeated']} of them repeated file tokens); N = {pool}",
        flush=True,
    )
    if args.trace_only:
        return 0
    calibration = bench_calibration(args.calibration, args.artifacts, args.servers, "joint_bench")
    if args.joint_calibration and not Path(args.joint_calibration).exists():
        raise SystemExit(f"joint_bench: error: joint calibration {args.joint_calibration} does not exist")
    cfg = TierBenchConfig(
        max_total_tokens=pool,
        big_pool=args.big_pool,
        servers=tuple(args.servers),
        page_size=args.page_size,
        store_fraction=args.store_fraction,
        concurrency=tc.concurrency,
        output_tokens=tc.output_tokens,
        runs=args.runs,
        out=args.out,
    )
    report = run_bench(model, str(calibration), trace, cfg, args.joint_calibration)
    print(format_report(report))
    print(f"(report.md, report.json and logs in {args.out}/; {time.perf_counter() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
