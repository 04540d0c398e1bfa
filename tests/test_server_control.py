"""Real servers, exact control: kvtc with compression effectively off (huge idle threshold, big pool) must
give byte-identical generations and cached-token counts to SGLang's own radix cache (temperature 0)."""

from __future__ import annotations

import openai
import pytest
from serve_support import hf_model, scheduler_errors, start

from kvtc_sglang.serve.launcher import ServerSpec
from kvtc_sglang.serve.server import TREE_CACHE_LINE
from kvtc_sglang.serve.workload import WorkloadConfig, run_agentic, run_shared_prompt

pytestmark = [pytest.mark.server, pytest.mark.model]

WL = WorkloadConfig(seed=3, conversations=2, turns=3, tool_chars=400, concurrency=1, system_prompts=2,
                    system_chars=1000, users=3, max_tokens=16, timeout=120.0)
FLAGS = ["--enable-cache-report", "--disable-overlap-schedule"]


def _run(backend: str, model: str, calibration: str, tmp_path) -> tuple[list, str]:
    extra = FLAGS + (["--kvtc-idle-seconds", "1000000", "--kvtc-store-fraction", "0.1"] if backend == "kvtc" else [])
    spec = ServerSpec(backend, model, calibration, max_total_tokens=16384, extra=extra)
    srv = start(spec, tmp_path / f"{backend}.log")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        runs = [run_agentic(client, "default", WL, lambda: None), run_shared_prompt(client, "default", WL,
                                                                                     lambda: None)]
    finally:
        srv.stop()
    return [r for run in runs for r in run.results], srv.log_text()


@pytest.fixture(scope="module")
def both(artifact_path, tmp_path_factory):
    model = hf_model()
    tmp = tmp_path_factory.mktemp("control")
    return {b: _run(b, model, str(artifact_path), tmp) for b in ("vanilla", "kvtc")}


def test_kvtc_backend_is_the_one_serving(both):
    assert TREE_CACHE_LINE in both["kvtc"][1]
    assert TREE_CACHE_LINE not in both["vanilla"][1]


def test_generations_and_cached_tokens_identical(both):
    vanilla, kvtc = both["vanilla"][0], both["kvtc"][0]
    assert [r.key for r in vanilla] == [r.key for r in kvtc]
    for v, k in zip(vanilla, kvtc, strict=True):
        assert not v.error and not k.error, (v.error, k.error)
        assert v.text and v.text == k.text, (v.key, v.text, k.text)
        assert (v.prompt_tokens, v.cached_tokens) == (k.prompt_tokens, k.cached_tokens), v.key
    assert sum(r.cached_tokens for r in kvtc) > 0  # the workload does reuse prefixes


def test_no_scheduler_error(both):
    for backend, (_results, log) in both.items():
        assert scheduler_errors(log) == [], backend
