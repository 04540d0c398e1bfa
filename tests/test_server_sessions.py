"""Smoke test of the session bench on one real server (tiny sizes): SGLang's own benchmark and the own client
replay the same trace, offline, and the report carries real numbers."""

from __future__ import annotations

import json

import pytest
from serve_support import hf_model

from kvtc_sglang.serve.session_bench import SessionBenchConfig, format_report, run_bench
from kvtc_sglang.serve.sessions import TraceConfig, write_trace

pytestmark = [pytest.mark.server, pytest.mark.model]


def test_runner_on_one_real_server(tmp_path):
    model = hf_model()
    tc = TraceConfig(sessions=2, turns=2, first_read_tokens=(200, 300), tool_tokens=(40, 60), output_tokens=4,
                     concurrency=2)
    trace_path = tmp_path / "trace.json"
    trace = write_trace(tc, model, trace_path)
    cfg = SessionBenchConfig(max_total_tokens=4096, servers=("vanilla",), workloads=("serving", "own"),
                             out=tmp_path / "out", workload_timeout=300.0)
    report = run_bench(model, "", trace_path, trace, cfg=cfg)
    for workload in ("serving", "own"):
        s = report["summaries"][workload]["vanilla"]
        assert s["requests"] == 4 and s["errors"] == 0
        assert s["ttft_mean"] > 0 and len(s["ttft_per_turn"]) == 2
        assert s["prompt_tokens"] > 2 * 200 and s["cached_tokens"] > 0  # turn 2 reuses turn 1's prefix
        assert s["server_prefill_tokens"] == s["prefilled_tokens"]  # usage and /metrics agree
        assert s["prefill_forward_s"] > 0 and s["codec_s"] is None
    own, serving = (report["summaries"][w]["vanilla"] for w in ("own", "serving"))
    assert own["prompt_tokens"] == serving["prompt_tokens"]  # same trace, same fixed answer lengths
    saved = json.loads((cfg.out / "report.json").read_text())
    assert saved["pools"]["vanilla"] == 4096 and "needs vanilla, kvtc and big" in format_report(saved)
    assert (cfg.out / "logs" / "metrics_vanilla.txt").read_text().count("sglang:realtime_tokens_total") > 0
