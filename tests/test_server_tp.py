"""Real servers at ``--tp-size 2`` on SGLang's CPU engine (two ranks, one core each, gloo between them): the
exact control (kvtc with compression off against SGLang's own cache, both at tp 2) and kvtc under memory
pressure (compressions, restores, ``/flush_cache``, an aborted stream, SGLang's strict idle check) with
SGLang's rank-consensus checker on. Each rank runs its own codec on its own KV heads (SmolLM2's 3 KV heads are
padded to 4: rank 1 holds head 2 and a zero head) with its own calibration; the ranks' trees must stay equal.
"""

from __future__ import annotations

import pytest
from serve_support import assert_identical, control_run, hf_model, pressure_run, scheduler_errors

from kvtc_sglang.cache.report import parse_line
from kvtc_sglang.serve.server import TREE_CACHE_LINE
from kvtc_sglang.serve.workload import WorkloadConfig

pytestmark = [pytest.mark.server, pytest.mark.model]

TP = ("--tp-size", "2")
CHECKER = {"SGLANG_ENABLE_RANK_CONSENSUS_CHECKER": "1"}  # SGLang's digest checks of match/insert/evict
# Compression off at tp 2 (an idle time is refused there): the encoder never wakes on a pool this big.
OFF = ("--kvtc-idle-watermark", "0.99", "--kvtc-store-fraction", "0.1")
WL_CONTROL = WorkloadConfig(seed=3, conversations=2, turns=2, tool_chars=400, concurrency=1, system_prompts=2,
                            system_chars=800, users=3, max_tokens=12, timeout=240.0)
WL = WorkloadConfig(seed=5, conversations=4, turns=4, tool_chars=700, concurrency=4, max_tokens=12, timeout=300.0)
TREE_COUNTERS = ("#compression", "#restore", "#restored-token", "#compressed-token", "#dropped-token")


@pytest.fixture(scope="module")
def control(artifact_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp2_control")
    return {b: control_run(b, hf_model(), str(artifact_path), tmp, WL_CONTROL, flags=TP, kvtc_flags=OFF)
            for b in ("vanilla", "kvtc")}  # fmt: skip


@pytest.fixture(scope="module")
def pressure(artifact_path, tmp_path_factory):
    return pressure_run(hf_model(), str(artifact_path), page=16, overlap=True, log_dir=tmp_path_factory.mktemp("tp2"),
                        wl=WL, pool=2048, flags=TP, env=CHECKER)  # fmt: skip


def _last_lines(log: str) -> dict[str, dict]:
    """The last ``KVTC cache.`` line of each rank (``TP0``, ``TP1``)."""
    out = {}
    for line in log.splitlines():
        if "KVTC cache. " in line:
            for rank in ("TP0", "TP1"):
                if f" {rank}]" in line:
                    out[rank] = parse_line(line)
    return out


def test_control_identical_to_vanilla_at_tp2(control):
    (vanilla, vlog), (kvtc, klog) = control["vanilla"], control["kvtc"]
    assert_identical(vanilla, kvtc)
    assert TREE_CACHE_LINE in klog
    assert "kvtc: rank 1 of 2, calibration smollm2-135m-instruct.r16.tp2-rank1.kvtc.safetensors" in klog
    assert scheduler_errors(vlog) == [] and scheduler_errors(klog) == []


def test_compresses_and_restores_at_tp2(pressure):
    m = pressure["metrics"]  # rank 0's counters
    assert m["compressions_total"] > 0 and m["restores_total"] > 0, m
    assert m["checksum_failures_total"] == 0, m
    for turn in pressure["results"]:
        for r in turn:
            assert not r.error and r.text.strip(), (r.key, r.error)


def test_both_ranks_took_the_same_decisions(pressure):
    lines = _last_lines(pressure["log"])
    assert set(lines) == {"TP0", "TP1"}, "each rank logs its KVTC cache line"
    assert lines["TP0"]["#compression"] > 0
    for counter in TREE_COUNTERS:
        assert lines["TP0"][counter] == lines["TP1"][counter], (counter, lines)
    assert "Rank consensus checker is enabled" in pressure["log"]
    assert "Found rank divergence" not in pressure["log"] and "ranks' radix trees diverged" not in pressure["log"]


def test_flush_abort_and_idle_check_at_tp2(pressure):
    assert pressure["flush"] == 200
    assert pressure["aborted_chunks"] == 5 and pressure["health_after_abort"] == 200
    assert any(r.cached_tokens > 100 for r in pressure["results"][3])  # caching works again after the flush
    assert scheduler_errors(pressure["log"]) == []
