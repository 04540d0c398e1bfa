"""The tier benchmark's report code (serve/tier_bench.py, tier_report.py) on made-up summaries: no server, no model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvtc_sglang.serve.server_metrics import ServerCounters
from kvtc_sglang.serve.tier_bench import (
    TierBenchConfig,
    build_report,
    default_host_bytes,
    entries,
    merge_reports,
    parse_bytes,
    raw_bytes_per_token,
)
from kvtc_sglang.serve.tier_report import Entry, add_counters, aims, format_report, tier_shares, tokens_per_byte

H = 96 << 20


def summary(ttft: float, prefilled: int, kvtc: dict[str, float] | None = None) -> dict:
    return {"requests": 6, "errors": 0, "ttft_mean": ttft, "ttft_p90": ttft * 1.5, "ttft_per_turn": [ttft, ttft],
            "prompt_tokens": 10_000, "cached_tokens": 10_000 - prefilled, "prefilled_tokens": prefilled,
            "server_prefill_tokens": float(prefilled), "run_batch_s": 10.0, "codec_s": None if kvtc is None else 1.0,
            "codec_label": "", "kvtc": kvtc or {}, "wall_s": 60.0, "request_throughput": 0.1}


def host(tokens: float, used: float) -> dict[str, float]:
    return {"host_hits_total": 5.0, "host_hit_tokens_total": 4000.0, "host_seconds_total": 0.2,
            "host_demotions_total": 9.0, "host_demoted_bytes_total": used, "host_dropped_tokens_total": 0.0,
            "host_full_total": 0.0, "host_resident_tokens": tokens, "host_resident_bytes": used,
            "restored_tokens_total": 5000.0, "dropped_tokens_total": 0.0, "compression_ratio": 17.0}


SUMMARIES = {
    "vanilla": summary(10.0, 9000),
    "kvtc": summary(9.0, 8000, {"restored_tokens_total": 900.0, "dropped_tokens_total": 7000.0,
                                "compression_ratio": 17.5}),
    "kvtc+host@96M": summary(4.0, 3000, host(20_000, 20_000 * 1300)),
    "raw+host@96M": summary(9.0, 8500, host(4_000, 4_000 * 23_040)),
    "big": summary(3.0, 2500),
}


def test_parse_bytes() -> None:
    assert parse_bytes("96M") == parse_bytes("96MiB") == parse_bytes("96mb") == H
    assert parse_bytes("1.5G") == 3 << 29
    assert parse_bytes("4096") == parse_bytes(4096) == 4096
    for bad in ("x", "-1M", "0", "nanM"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_default_host_bytes_and_raw_size(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 30, "num_attention_heads": 9,
                                                      "num_key_value_heads": 3, "hidden_size": 576}))
    assert raw_bytes_per_token(tmp_path) == 23_040  # SmolLM2-135M: 30 x 2 x 3 x 64 x bf16
    h = default_host_bytes(24_000, 23_040)
    assert h % (1 << 20) == 0 and 24_000 * 23_040 / 6 <= h < 24_000 * 23_040 / 6 + (1 << 20)


def test_entries_order_and_flags() -> None:
    cols = entries(("vanilla", "kvtc", "kvtc+host", "raw+host", "big"), 2048, 32768, (H, 2 * H))
    assert [c.key for c in cols] == ["vanilla", "kvtc", "kvtc+host@96M", "raw+host@96M", "kvtc+host@192M",
                                     "raw+host@192M", "big"]
    assert cols[-1].pool == 32768 and cols[-1].backend == "vanilla"
    assert cols[3].flags() == ["--kvtc-codec", "raw", "--kvtc-host-bytes", str(H)]
    assert cols[1].flags() == [] and cols[1].backend == "kvtc"
    assert [c.key for c in entries(("raw+host", "vanilla"), 2048, 4096, (H,))] == ["vanilla", "raw+host@96M"]
    with pytest.raises(ValueError):
        entries(("kvtc+host",), 2048, 4096, ())
    with pytest.raises(ValueError):
        entries(("hicache",), 2048, 4096, (H,))


def test_shares_and_aims_met() -> None:
    shares = tier_shares(SUMMARIES)
    assert set(shares) == {"kvtc", "kvtc+host@96M", "raw+host@96M"}
    assert shares["kvtc+host@96M"]["ttft_mean"]["value"] == pytest.approx(6 / 7)
    assert shares["raw+host@96M"]["prefilled_tokens"]["value"] == pytest.approx(500 / 6500)
    assert tokens_per_byte(SUMMARIES["kvtc+host@96M"]) == pytest.approx(1 / 1300)
    assert tokens_per_byte(SUMMARIES["vanilla"]) is None
    got = aims(SUMMARIES, (H,))
    assert [a["met"] for a in got] == [True, True, True]
    assert "17.7x" in got[2]["detail"]


def test_aims_not_met_and_not_measurable() -> None:
    worse = {**SUMMARIES, "kvtc+host@96M": summary(6.0, 5000, host(20_000, 20_000 * 2000)),
             "raw+host@96M": summary(7.0, 6000, {"host_hits_total": 0.0})}
    got = aims(worse, (H,))
    assert [a["met"] for a in got] == [False, False, None]  # 57% < 80%; raw 43% >= half of 57%; no raw residents
    assert [a["met"] for a in aims({"vanilla": SUMMARIES["vanilla"]}, (H,))] == [None, None, None]


def test_add_counters_sums_totals_and_keeps_gauges() -> None:
    a = ServerCounters(100.0, 5.0, 1.0, 2.0, 3.0, None, "x", {"host_hits_total": 2.0, "host_resident_tokens": 50.0})
    b = ServerCounters(10.0, None, 1.0, 2.0, 3.0, 0.5, "x", {"host_hits_total": 3.0, "host_resident_tokens": 70.0})
    c = add_counters(a, b)
    assert c is not None and c.prefill_tokens == 110.0 and c.prefill_cache_tokens == 5.0 and c.codec_seconds == 0.5
    assert c.kvtc == {"host_hits_total": 5.0, "host_resident_tokens": 70.0}
    assert add_counters(None, b) is b


def test_report_renders_every_column_and_the_aims() -> None:
    trace = {"metadata": {"config": {"sessions": 14, "turns": 3, "first_read_tokens": [1200, 1500],
                                     "tool_tokens": [100, 200], "output_tokens": 8},
                          "estimated_prompt_tokens_total": 67_000, "estimated_context_total": 25_000}}
    cfg = TierBenchConfig(host_bytes=(H,))
    cols = [Entry("vanilla", 2048), Entry("kvtc", 2048), Entry("kvtc+host", 2048, H), Entry("raw+host", 2048, H),
            Entry("big", 32768)]
    runs = [SUMMARIES["vanilla"], summary(11.0, 9000)]
    report = build_report(trace, cfg, cols, {**SUMMARIES, "vanilla": {**SUMMARIES["vanilla"], "runs": runs}})
    assert report["capacity"]["sessions_over_pool"] == pytest.approx(25_000 / (0.875 * 2048 + 0.125 * 2048 * 17.25))
    text = format_report(json.loads(json.dumps(report)))
    assert "raw+host @ 2048, H=96M" in text and "vanilla (big) @ 32768" in text
    assert text.count("**met**") == 3 and "86%" in text
    assert "run 2" not in text  # the spread needs every server's runs


def test_merge_takes_the_later_column_and_recomputes_the_shares() -> None:
    trace = {"metadata": {"config": {"sessions": 2, "turns": 2, "first_read_tokens": [1, 2], "tool_tokens": [1, 2],
                                     "output_tokens": 8}, "estimated_prompt_tokens_total": 10,
                          "estimated_context_total": 10}}
    cols = [Entry("big", 32768), Entry("kvtc+host", 2048, H), Entry("vanilla", 2048)]
    a = json.loads(json.dumps(build_report(trace, TierBenchConfig(host_bytes=(H,), out=Path("a")), cols, SUMMARIES)))
    b = json.loads(json.dumps(build_report(trace, TierBenchConfig(host_bytes=(H,), out=Path("b")),
                                           [Entry("vanilla", 2048)], {"vanilla": summary(5.0, 9000)})))
    m = merge_reports([a, b])
    assert [c["key"] for c in m["columns"]] == ["vanilla", "kvtc+host@96M", "big"]
    assert m["merged_from"] == {"big": "a", "kvtc+host@96M": "a", "vanilla": "b"}
    assert m["shares"]["kvtc+host@96M"]["ttft_mean"]["value"] == pytest.approx(0.5)  # (5 - 4) / (5 - 3)
    assert "vanilla b" in format_report(m)
    with pytest.raises(ValueError):
        merge_reports([a, {**b, "trace_metadata": {}}])
