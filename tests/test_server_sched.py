"""The scheduler-facing defects of issue 12 through a real kvtc server (CPU engine, SGLang's strict idle
memory check on): ``--schedule-policy lpm`` with several conversations waiting under memory pressure,
``--kvtc-idle-seconds 0`` with a zero watermark (every idle node is compressed by the per-step tick,
between a request's chunks too), and one request of nearly the whole pool after the store filled up.
All must be served without a scheduler error or a stall."""

from __future__ import annotations

import json
import time

import openai
import pytest
from serve_support import chat_turn, hf_model, kvtc_metrics, scheduler_errors, start

from kvtc_sglang.serve.launcher import ServerSpec
from kvtc_sglang.serve.server import TREE_CACHE_LINE
from kvtc_sglang.serve.workload import WorkloadConfig, _excerpts

pytestmark = [pytest.mark.server, pytest.mark.model]

WL = WorkloadConfig(seed=11, conversations=6, turns=3, tool_chars=700, concurrency=6, max_tokens=8, timeout=300.0)
POOL = 2048
LONG = POOL - 64  # prompt tokens of the long request (+8 new): nearly the whole pool


@pytest.fixture(scope="module")
def run(artifact_path, tmp_path_factory):
    from concurrent.futures import ThreadPoolExecutor

    extra = ["--enable-cache-report", "--schedule-policy", "lpm", "--kvtc-idle-seconds", "0",
             "--kvtc-idle-watermark", "0", "--enable-metrics", "--chunked-prefill-size", "512"]
    spec = ServerSpec("kvtc", hf_model(), str(artifact_path), max_total_tokens=POOL, extra=extra)
    srv = start(spec, tmp_path_factory.mktemp("kvtc_sched") / "server.log")
    out: dict = {}
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        flat = _excerpts(WL.seed, WL.conversations * WL.turns, WL.tool_chars, "code")
        tools = [flat[c * WL.turns : (c + 1) * WL.turns] for c in range(WL.conversations)]
        convs = [[{"role": "system", "content": f"You are agent #{c}."}] for c in range(WL.conversations)]
        with ThreadPoolExecutor(WL.conversations) as pool:
            out["results"] = [chat_turn(client, convs, tools, t, pool, wl=WL, question="Explain.")
                              for t in range(WL.turns)]  # fmt: skip
        t0 = time.perf_counter()
        status, body = srv.post(
            "/generate",
            {"input_ids": [100 + (i * 7919) % 40000 for i in range(LONG)],
             "sampling_params": {"max_new_tokens": 8, "temperature": 0}},
            timeout=600.0,
        )
        out["long"] = (status, json.loads(body), time.perf_counter() - t0)
        time.sleep(3.0)  # idle: SGLang's strict memory check runs
        out["metrics"] = kvtc_metrics(srv)
        out["health"] = srv.get("/health")[0]
    finally:
        srv.stop()
    out["log"] = srv.log_text()
    return out


def test_lpm_idle_zero_conversations_served(run):
    for turn in run["results"]:
        for r in turn:
            assert not r.error, r.error
            assert r.text.strip(), r.key
    assert any(r.cached_tokens > 100 for r in run["results"][-1])  # prefixes came back from the cache


def test_compressed_and_loaded_back(run):
    m = run["metrics"]
    assert m["compressions_total"] > 0 and m["restores_total"] > 0, m
    assert m["checksum_failures_total"] == 0, m


def test_request_of_nearly_the_whole_pool_is_served(run):
    status, body, _seconds = run["long"]
    assert status == 200
    assert body["meta_info"]["prompt_tokens"] == LONG
    assert body["meta_info"]["completion_tokens"] == 8


def test_no_scheduler_error(run):
    assert TREE_CACHE_LINE in run["log"]
    assert scheduler_errors(run["log"]) == []
    assert run["health"] == 200
