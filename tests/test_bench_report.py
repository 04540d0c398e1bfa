"""Session-bench arithmetic and parsing: share of the big pool's gain, tables, SGLang's result line, /metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvtc_sglang.serve.bench_report import (
    format_table,
    percentile,
    plot_ttft_per_turn,
    share_of_gain,
    shares,
    summarize,
    ttft_per_turn,
)
from kvtc_sglang.serve.server_metrics import parse_samples, prefill_log_tokens, server_counters
from kvtc_sglang.serve.session_replay import TurnResult
from kvtc_sglang.serve.sglang_bench import GSPConfig, agentic_command, gsp_command, parse_result

DATA = Path(__file__).resolve().parent / "data"
POOLS = {"vanilla": 8192, "kvtc": 8192, "big": 40960}


def test_share_of_gain_known_values():
    assert share_of_gain(10.0, 6.0, 2.0).value == pytest.approx(0.5)
    assert "50% of the big pool's gain" in share_of_gain(10.0, 6.0, 2.0).note
    assert share_of_gain(10.0, 1.0, 2.0).value == pytest.approx(9 / 8)  # kvtc beat the big pool
    assert share_of_gain(10.0, 12.0, 2.0).value == pytest.approx(-0.25)  # kvtc slower than vanilla
    assert share_of_gain(1000, 400, 0).value == pytest.approx(0.6)


@pytest.mark.parametrize("big", [10.0, 9.9, 12.0])
def test_share_without_a_gain_says_so(big):
    s = share_of_gain(10.0, 6.0, big)
    assert s.value is None and s.note.startswith("no gain to capture")
    with pytest.raises(ValueError, match="min_gain must be >= 0"):
        share_of_gain(1.0, 1.0, 1.0, min_gain=-1)


def test_percentile_matches_numpy():
    xs = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6]
    for q in (0, 50, 90, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    assert percentile([], 90) == 0.0


def _results(ttfts: list[list[float]], prompt: int, cached: int) -> list[TurnResult]:
    return [TurnResult(s, t, prompt_tokens=prompt, cached_tokens=cached, ttft=x)
            for s, row in enumerate(ttfts) for t, x in enumerate(row)]


def _summaries() -> dict[str, dict]:
    return {"vanilla": summarize(_results([[10, 12], [8, 10]], 1000, 0), 40.0, None),
            "kvtc": summarize(_results([[10, 6], [8, 4]], 1000, 500), 30.0, None),
            "big": summarize(_results([[10, 2], [8, 2]], 1000, 800), 20.0, None)}


def test_summary_and_table():
    per = _summaries()
    v = per["vanilla"]
    assert v["ttft_mean"] == 10 and v["ttft_p90"] == pytest.approx(11.4) and v["request_throughput"] == 0.1
    assert v["prefilled_tokens"] == 4000 and per["kvtc"]["prefilled_tokens"] == 2000
    assert v["ttft_per_turn"] == [9, 11] and per["big"]["ttft_per_turn"] == [9, 2]
    text = format_table("agentic", per, POOLS)
    assert "| | vanilla @ 8192 | kvtc @ 8192 | vanilla @ 40960 |" in text
    assert "| TTFT mean / p90 (s) | 10.00 / 11.40 | 7.00 / 9.40 | 5.50 / 9.40 |" in text
    assert "| tokens prefilled (prompt - cached) | 4000 | 2000 | 800 |" in text
    assert "mean TTFT: 67% of the big pool's gain" in text  # (10 - 7) / (10 - 5.5)
    assert "tokens prefilled: 62% of the big pool's gain" in text  # 2000 / 3200
    got = shares(per)
    assert got["ttft_mean"]["value"] == pytest.approx(3 / 4.5)


def test_table_without_a_gain():
    per = _summaries()
    per["big"] = per["vanilla"]
    text = format_table("agentic", per, POOLS)
    assert "mean TTFT: no gain to capture" in text and "tokens prefilled: no gain to capture" in text
    assert "needs vanilla, kvtc and big" in format_table("x", {"vanilla": per["vanilla"]}, POOLS)


def test_failed_requests_are_counted_not_averaged():
    rs = _results([[1.0, 2.0]], 100, 0)
    rs[1].error = "APITimeoutError"
    s = summarize(rs, 10.0, None)
    assert s["errors"] == 1 and s["ttft_mean"] == 1.0 and ttft_per_turn(rs) == [1.0]


def test_plot_writes_a_png(tmp_path):
    path = plot_ttft_per_turn({"agentic": _summaries()}, POOLS, tmp_path / "f" / "ttft.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_sglang_result_line():
    # A real result line of `sglang.benchmark.serving --dataset-name agentic-trace --output-details --cache-report`
    # (2 sessions x 2 turns on a CPU vanilla server; server_info removed).
    results, summary = parse_result((DATA / "sglang_serving_agentic_vanilla.jsonl").read_text(), [2, 2])
    assert [(r.session, r.turn) for r in results] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r.prompt_tokens for r in results] == [423, 541, 370, 479]
    assert [r.cached_tokens for r in results] == [0, 430, 41, 377]
    assert all(r.ok and r.output_tokens == 8 for r in results)
    mean = sum(r.ttft for r in results) / 4
    assert summary["mean_ttft_ms"] == pytest.approx(1000 * mean) and summary["completed"] == 4
    with pytest.raises(ValueError, match="expected 6 requests"):
        parse_result((DATA / "sglang_serving_agentic_vanilla.jsonl").read_text(), [3, 3])


def test_benchmark_commands():
    trace = {"metadata": {"config": {"concurrency": 3, "seed": 1, "output_tokens": 24}}, "conversations": [[{}]] * 5}
    cmd = agentic_command("http://127.0.0.1:1", "/m", Path("t.json"), trace, Path("o.jsonl"))
    joined = " ".join(cmd)
    for part in ("-m sglang.benchmark.serving", "--backend sglang-oai-chat", "--dataset-name agentic-trace",
                 "--num-prompts 5", "--sharegpt-output-len 24", "--max-concurrency 3", "--warmup-requests 0",
                 "--tokenizer /m", "--cache-report", "--output-details"):
        assert part in joined
    g = " ".join(gsp_command("http://h:1", "/m", GSPConfig(turns=4), Path("o")))
    assert "--dataset-name generated-shared-prefix" in g and "--gsp-num-turns 4" in g
    with pytest.raises(ValueError, match="turns must be >= 1, got 0"):
        GSPConfig(turns=0)


def test_metrics_of_a_real_cpu_server():
    # /metrics of a real vanilla SGLang 0.5.23 CPU server after three streamed requests (3251 new tokens, then
    # 8 and 7 new tokens on cached prefixes of 3245 and 1643) and SGLang's two start-up warm-up requests.
    c = server_counters((DATA / "metrics_vanilla_cpu.txt").read_text())
    assert c.prefill_tokens == 3273 and c.prefill_cache_tokens == 4888
    assert c.prefill_forward_seconds == pytest.approx(50.465016455999944) and c.prefill_forward_requests == 5
    assert c.run_batch_seconds == pytest.approx(64.77969275199999)
    assert c.codec_seconds is None
    d = c.minus(c)
    assert d.prefill_tokens == 0 and d.codec_seconds is None


def test_metrics_kvtc_codec_counter_and_fallback():
    base = '# HELP x\nsglang:kvtc_restore_seconds_total 1.5\nsglang:kvtc_compress_seconds_total{a="b"} 0.25\n'
    c = server_counters(base)
    assert c.codec_seconds == pytest.approx(1.75) and "restore + compress" in c.codec_label
    c = server_counters(base + "sglang:kvtc_scheduler_codec_seconds_total 3.0\n")
    assert c.codec_seconds == 3.0 and c.codec_label == "kvtc scheduler codec s"
    before = server_counters("sglang:kvtc_restores_total 2\nsglang:kvtc_compression_ratio 15.0\n")
    after = server_counters("sglang:kvtc_restores_total 7\nsglang:kvtc_compression_ratio 17.5\n")
    assert after.minus(before).kvtc == {"restores_total": 5.0, "compression_ratio": 17.5}  # gauges: as now
    s = parse_samples('m{path="/a,b",x="y\\"z"} 2e3 1700000000\n')
    assert s[0].value == 2000 and s[0].label("path") == "/a,b"
    with pytest.raises(ValueError, match="line 1: expected"):
        parse_samples("not a sample line at all\n")


def test_prefill_lines_of_a_real_log():
    # The `Prefill batch` lines of the same server's log.
    batches, new, cached = prefill_log_tokens((DATA / "server_log_prefill_vanilla_cpu.txt").read_text())
    assert (batches, new, cached) == (5, 3273, 4888)


def test_reuse_only_matching_servers():
    from kvtc_sglang.serve.session_bench import reusable, trace_sha256

    trace = {"conversations": [[{"messages": [{"role": "user", "content": "a"}]}]]}
    sha = trace_sha256(trace)
    per = _summaries()
    old = {"trace_sha256": sha, "pools": POOLS, "gsp": None, "out": "out/x",
           "summaries": {"own": per}, "servers": {n: {"startup_s": 1.0, "total_s": 2.0} for n in per}}
    got = reusable(old, "big", 40960, sha, gsp=None, workloads=["own"])
    assert got is not None and got["workloads"]["own"] == per["big"] and got["reused_from"] == "out/x"
    assert reusable(old, "big", 20480, sha, gsp=None, workloads=["own"]) is None  # another pool
    assert reusable(old, "big", 40960, "0" * 64, gsp=None, workloads=["own"]) is None  # another trace
    assert reusable(old, "big", 40960, sha, gsp=None, workloads=["own", "serving"]) is None  # a workload missing
    assert reusable(None, "big", 40960, sha, gsp=None, workloads=["own"]) is None
    assert reusable(old, "big", 40960, sha, gsp=None, workloads=["own"], repeats=2) is None  # one run vs two
    twice = {**old, "config": {"repeats": "2"}}
    assert reusable(twice, "big", 40960, sha, gsp=None, workloads=["own"], repeats=2) is not None
    assert reusable(old, "big", 40960, sha, gsp=None, workloads=["own"], big_max_running=2) is None  # capped big
    assert reusable(old, "kvtc", 8192, sha, gsp=None, workloads=["own"], big_max_running=2) is not None  # not big
    capped = {**old, "config": {"big_max_running": "2"}}
    assert reusable(capped, "big", 40960, sha, gsp=None, workloads=["own"], big_max_running=2) is not None


def test_repeated_runs_are_pooled_and_their_spread_is_shown():
    from kvtc_sglang.serve.session_bench import Outcome, SessionBenchConfig, pooled

    def runs(name: str, per_run: list[list[list[float]]], cached: int) -> dict:
        outcomes = [Outcome(_results(t, 1000, cached), 10.0) for t in per_run]
        return pooled(outcomes, [summarize(o.results, o.wall, None) for o in outcomes], None)

    per_server = {"vanilla": runs("vanilla", [[[10, 10]], [[12, 12]]], 0),
                  "kvtc": runs("kvtc", [[[6, 6]], [[12, 12]]], 500),  # run 2: no better than vanilla
                  "big": runs("big", [[[2, 2]], [[4, 4]]], 800)}
    v = per_server["vanilla"]
    assert v["ttft_mean"] == pytest.approx(11.0) and v["requests"] == 4 and v["wall_s"] == 20.0
    assert v["prefilled_tokens"] == 4000 and len(v["runs"]) == 2 and v["runs"][1]["ttft_mean"] == 12.0
    s = shares(per_server)
    assert s["ttft_mean"]["value"] == pytest.approx((11 - 9) / (11 - 3))  # pooled: 25%
    assert s["ttft_mean"]["runs"] == pytest.approx([0.5, 0.0])
    assert s["ttft_mean"]["kvtc_over_vanilla"] == pytest.approx([0.6, 1.0])
    table = format_table("agentic", per_server, POOLS)
    assert "2 runs per server" in table and "0.60x, 1.00x (min 0.60x, max 1.00x)" in table
    assert "share of the big pool's TTFT gain 50%, 0%" in table
    single = pooled([Outcome(_results([[1.0]], 10, 0), 1.0)], [summarize(_results([[1.0]], 10, 0), 1.0, None)], None)
    assert "runs" not in single  # one run: the summary as before
    with pytest.raises(ValueError, match="repeats must be >= 1, got 0"):
        SessionBenchConfig(repeats=0)
