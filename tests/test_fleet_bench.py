"""The fleet/restart benchmark's summaries, aims and tables (``kvtc_sglang.serve.fleet_report``) and server flags
(``fleet_bench``), without a server."""

from __future__ import annotations

from kvtc_sglang.serve.fleet_bench import FleetConfig, server_flags
from kvtc_sglang.serve.fleet_report import fleet_aim, fleet_table, restart_aim, restart_table, resumed, summarize
from kvtc_sglang.serve.server_metrics import ServerCounters
from kvtc_sglang.serve.session_replay import TurnResult


def _counters(prefill: float, hits: float = 0.0, kvtc: bool = True) -> ServerCounters:
    values = {"l3_hits_total": hits, "l3_hit_tokens_total": 256 * hits} if kvtc else {}
    return ServerCounters(prefill, 0.0, None, None, None, None, "", values)


def _results() -> list[TurnResult]:
    return [TurnResult(0, 0, prompt_tokens=1000, cached_tokens=0, ttft=2.0),
            TurnResult(0, 1, prompt_tokens=1300, cached_tokens=1024, ttft=0.5),
            TurnResult(1, 1, prompt_tokens=900, error="APIError: boom")]


def test_summarize_counts_usage_and_both_replicas_counters() -> None:
    before = [_counters(100.0), _counters(50.0)]
    after = [_counters(1100.0, hits=2), _counters(326.0, hits=1)]
    s = summarize(_results(), before, after, wall=10.0)
    assert (s["requests"], s["errors"]) == (3, 1)
    assert (s["prompt_tokens"], s["cached_tokens"], s["prefilled_tokens"]) == (2300, 1024, 1276)
    assert s["server_prefill_tokens"] == 1276 and s["server_prefill_per_replica"] == [1000.0, 276.0]
    assert s["kvtc"]["l3_hits_total"] == 3 and s["kvtc"]["l3_hit_tokens_total"] == 768
    assert s["ttft_per_turn"] == [2.0, 0.5] and s["ttft_mean"] == 1.25
    vanilla = summarize(_results(), [_counters(0, kvtc=False)] * 2, [_counters(9, kvtc=False)] * 2, 1.0)
    assert vanilla["kvtc"] == {}
    table = fleet_table({"vanilla": vanilla, "kvtc": s})
    assert "| L3 puts (MiB) / hits / hit tokens | - | 0 (0.0) / 3 / 768 |" in table


def test_fleet_aim_compares_round_robin_fleets() -> None:
    v = {"prefilled_tokens": 10000, "errors": 0}
    assert fleet_aim({"vanilla/round_robin": v, "kvtc/round_robin": {"prefilled_tokens": 3000, "errors": 0}})["met"]
    miss = fleet_aim({"vanilla/round_robin": v, "kvtc/round_robin": {"prefilled_tokens": 4500, "errors": 0}})
    assert miss["met"] is False and miss["text"] == "not met (0.45x)"
    assert fleet_aim({"kvtc/cache_aware": v})["met"] is None


def test_restart_rows_and_aim() -> None:
    rows = resumed([TurnResult(0, 1, prompt_tokens=1300, cached_tokens=1024, ttft=0.4),
                    TurnResult(1, 1, prompt_tokens=1200, cached_tokens=3, ttft=3.0)])
    assert [r["restored"] for r in rows] == [True, False] and rows[1]["prefilled_tokens"] == 1197
    aim = restart_aim(rows)
    assert aim["met"] is False and aim["text"] == "not met (1/2 restored)"
    assert restart_aim(rows[:1])["met"] and not restart_aim([])["met"]
    table = restart_table({"kvtc+dir": {"resumed": rows, "next": {"ttft_mean": 1.7}}})
    assert "| 0 | restored 1024 / 1300, 0.40 s |" in table and "| all | 1473 prefilled, TTFT mean 1.70 s |" in table


def test_server_flags() -> None:
    cfg = FleetConfig()
    assert server_flags("vanilla", cfg, ("directory", {"path": "/x"})) == []
    flags = server_flags("kvtc", cfg, ("mooncake", {"master_server_address": "127.0.0.1:1"}))
    assert flags[flags.index("--kvtc-l3") + 1] == "mooncake" and '"chunk_tokens": 128' in flags[-1]
    assert "write_policy" not in flags[-1]  # kvtc's default: write-through
    back = server_flags("kvtc+wb", cfg, ("mooncake", {"master_server_address": "127.0.0.1:1"}))
    assert '"write_policy": "write_back"' in back[-1]
    assert "--kvtc-l3" not in server_flags("kvtc", cfg)
