"""Real kvtc servers under memory pressure (page size 1 with SGLang's overlap scheduler, page size 16 with the
normal loop): four concurrent conversations through the ``openai`` client on a pool too small for them,
``/flush_cache`` in the middle, a streaming request aborted half way, SGLang's strict idle memory check on;
compression runs in the background (the default). The backend's counters are read where users read them:
``/metrics`` (``--enable-metrics``) and the ``KVTC cache.`` log line."""

from __future__ import annotations

import time

import openai
import pytest
from serve_support import hf_model, kvtc_metrics, scheduler_errors, start

from kvtc_sglang.cache.report import parse_line
from kvtc_sglang.serve.launcher import ServerSpec
from kvtc_sglang.serve.server import TREE_CACHE_LINE
from kvtc_sglang.serve.workload import WorkloadConfig, chat

pytestmark = [pytest.mark.server, pytest.mark.model]

WL = WorkloadConfig(seed=5, conversations=4, turns=4, tool_chars=700, concurrency=4, max_tokens=12, timeout=180.0)
POOL = 2048  # four conversations of up to ~900 tokens do not fit next to the compressed store


def _turn(client, convs, tools, turn, pool) -> list:
    for c, msgs in enumerate(convs):
        msgs.append({"role": "user", "content": f"Tool output:\n{tools[c][turn]}\n\nWhat does this code do?"})
    futs = [pool.submit(chat, client, "default", f"c{c}/t{turn}", list(m), WL) for c, m in enumerate(convs)]
    results = [f.result() for f in futs]
    for msgs, r in zip(convs, results, strict=True):
        msgs.append({"role": "assistant", "content": r.text or "(no answer)"})
    return results


def _aborted_stream(client) -> int:
    """Start a long streamed answer and drop the connection after a few chunks; returns chunks read."""
    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Write a long story about a compiler."}],
        max_tokens=200, temperature=0, stream=True, timeout=120)
    n = 0
    for _chunk in stream:
        n += 1
        if n >= 5:
            break
    stream.close()
    return n


@pytest.fixture(scope="module", params=[(1, True), (16, False)], ids=["page1-overlap", "page16-normal-loop"])
def run(request, artifact_path, tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    from kvtc_sglang.serve.workload import _excerpts

    page, overlap = request.param
    extra = ["--enable-cache-report", "--enable-metrics", "--page-size", str(page)]
    if not overlap:
        extra.append("--disable-overlap-schedule")
    spec = ServerSpec("kvtc", hf_model(), str(artifact_path), max_total_tokens=POOL, extra=extra)
    srv = start(spec, tmp_path_factory.mktemp(f"kvtc_p{page}") / "server.log")
    out = {"page": page}
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        flat = _excerpts(WL.seed, WL.conversations * WL.turns, WL.tool_chars, "code")
        tools = [flat[c * WL.turns:(c + 1) * WL.turns] for c in range(WL.conversations)]
        convs = [[{"role": "system", "content": f"You are agent #{c}."}] for c in range(WL.conversations)]
        with ThreadPoolExecutor(WL.conversations) as pool:
            before = [_turn(client, convs, tools, t, pool) for t in range(2)]
            out["aborted_chunks"] = _aborted_stream(client)
            # The aborted stream may still be in the scheduler: SGLang refuses (400) a flush while any request
            # runs or waits, and its ?timeout= waits for the scheduler to go idle first.
            out["flush"] = srv.post("/flush_cache?timeout=120", timeout=180.0)[0]
            after = [_turn(client, convs, tools, t, pool) for t in range(2, WL.turns)]
        out["results"] = before + after
        out["health_after_abort"] = srv.get("/health")[0]
        time.sleep(3.0)  # idle: SGLang's strict memory check runs; the reporter logs the final counters
        out["metrics"] = kvtc_metrics(srv)
    finally:
        srv.stop()
    out["log"] = srv.log_text()
    return out


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
