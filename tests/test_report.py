"""The counters reporter: SGLang-style log line (on change, rate-limited, periodic) and its parser."""

from __future__ import annotations

import logging

import pytest

from kvtc_sglang.cache.report import KVTCReporter, ReporterConfig, format_line, parse_line
from kvtc_sglang.cache.stats import KVTCStats


def test_line_round_trips():
    s = KVTCStats(resident_nodes=3, resident_tokens=700, resident_raw_bytes=8_064_000, resident_blob_bytes=450_000,
                  compressions=9, restores=2, restored_tokens=300, restore_seconds=0.25, checksum_failures=1,
                  dropped_tokens=64)
    c = s.as_dict()
    c["store_use"] = 0.5
    got = parse_line("[2026-01-01 00:00:00] " + format_line(c))
    assert got["#compressed-token"] == 700 and got["#compression"] == 9 and got["#restore"] == 2
    assert got["ratio"] == pytest.approx(s.ratio, abs=0.01) and got["restore-ms"] == 250.0
    assert got["#checksum-failure"] == 1 and got["#dropped-token"] == 64 and got["store usage"] == 0.5
    with pytest.raises(ValueError, match="not a KVTC cache line"):
        parse_line("Prefill batch, #new-seq: 1")


def test_logs_on_change_rate_limited_and_periodically(caplog):
    rep = KVTCReporter(ReporterConfig(interval=30.0, min_interval=1.0), enable_metrics=False)
    s = KVTCStats()
    with caplog.at_level(logging.INFO, logger="kvtc_sglang.cache.report"):
        rep.tick(s.as_dict(), 1000, now=0.0)  # first tick: a line
        rep.tick(s.as_dict(), 1000, now=5.0)  # unchanged: nothing
        s.compressions = 1
        rep.tick(s.as_dict(), 1000, now=5.5)  # changed: a line
        s.compressions = 2
        rep.tick(s.as_dict(), 1000, now=6.0)  # changed but within min_interval: nothing yet
        rep.tick(s.as_dict(), 1000, now=6.6)  # now it is logged
        rep.tick(s.as_dict(), 1000, now=40.0)  # unchanged, but the interval passed
    lines = [r.getMessage() for r in caplog.records if "KVTC cache." in r.getMessage()]
    assert rep.lines == 4 and len(lines) == 4
    assert [parse_line(x)["#compression"] for x in lines] == [0, 1, 2, 2]
    with pytest.raises(ValueError, match="min_interval"):
        ReporterConfig(interval=1.0, min_interval=2.0)
