"""Real kvtc servers under memory pressure (page size 1 with SGLang's overlap scheduler, page size 16 with the
normal loop): four concurrent conversations through the ``openai`` client on a pool too small for them,
``/flush_cache`` in the middle, a streaming request aborted half way, SGLang's strict idle memory check on;
page size 1 runs the background encode worker (``--kvtc-encode background``, the GPU default), page size 16 the
CPU default (``auto``: encodes inline on the scheduler thread). The backend's counters are read where users read
them: ``/metrics`` (``--enable-metrics``) and the ``KVTC cache.`` log line."""

from __future__ import annotations

import pytest
from serve_support import hf_model, pressure_run, scheduler_errors

from kvtc_sglang.cache.report import parse_line
from kvtc_sglang.serve.server import TREE_CACHE_LINE
from kvtc_sglang.serve.workload import WorkloadConfig

pytestmark = [pytest.mark.server, pytest.mark.model]

WL = WorkloadConfig(seed=5, conversations=4, turns=4, tool_chars=700, concurrency=4, max_tokens=12, timeout=180.0)
POOL = 2048  # four conversations of up to ~900 tokens do not fit next to the compressed store


@pytest.fixture(scope="module", params=[(1, True, "background"), (16, False, "auto")],
                ids=["page1-overlap-background", "page16-normal-loop-auto"])
def run(request, artifact_path, tmp_path_factory):
    page, overlap, encode = request.param
    log_dir = tmp_path_factory.mktemp(f"kvtc_p{page}")
    out = pressure_run(hf_model(), str(artifact_path), page=page, overlap=overlap, log_dir=log_dir, wl=WL, pool=POOL,
                       flags=("--kvtc-encode", encode))
    out["encode"] = encode
    return out


def test_encodes_ran_where_the_mode_puts_them(run):
    m = run["metrics"]
    assert m["encoded_tokens_total"] > 0, m
    if run["encode"] == "background":  # the worker's seconds; the scheduler thread only restores and commits
        assert m["worker_seconds_total"] > 0, m
    else:  # auto on the CPU: inline, no worker thread at all
        assert m["worker_seconds_total"] == 0 and "inline encodes" in run["log"], m


def test_answers_non_empty(run):
    for turn in run["results"]:
        for r in turn:
            assert not r.error, r.error
            assert r.text.strip(), r.key


def test_compresses_and_restores_under_pressure(run):
    m = run["metrics"]
    assert m["compressions_total"] > 0, m
    assert m["restores_total"] > 0, m
    assert m["checksum_failures_total"] == 0, m
    assert m["compressed_tokens_total"] >= m["compressions_total"]


def test_counters_in_the_log_match_metrics(run):
    lines = [parse_line(x) for x in run["log"].splitlines() if "KVTC cache. " in x]
    assert lines, "no KVTC cache line in the server log"
    last = lines[-1]
    assert last["#compression"] == run["metrics"]["compressions_total"]
    assert last["#restore"] == run["metrics"]["restores_total"]
    assert last["#checksum-failure"] == 0


def test_flush_cache_mid_run_empties_the_cache(run):
    assert run["flush"] == 200
    first_after = run["results"][2]  # each conversation's first request after /flush_cache
    for r in first_after:
        assert r.cached_tokens < 32, (r.key, r.cached_tokens)  # only the shared chat-template head can hit
    assert any(r.cached_tokens > 100 for r in run["results"][3])  # and caching works again


def test_aborted_stream_leaves_server_healthy(run):
    assert run["aborted_chunks"] == 5
    assert run["health_after_abort"] == 200


def test_kvtc_served_without_scheduler_error(run):
    assert TREE_CACHE_LINE in run["log"]
    assert scheduler_errors(run["log"]) == []
