"""Real servers, exact control: kvtc with compression effectively off (huge idle threshold, big pool) must
give byte-identical generations and cached-token counts to SGLang's own radix cache (temperature 0)."""

from __future__ import annotations

import pytest
from serve_support import assert_identical, control_run, hf_model, scheduler_errors

from kvtc_sglang.serve.server import TREE_CACHE_LINE
from kvtc_sglang.serve.workload import WorkloadConfig

pytestmark = [pytest.mark.server, pytest.mark.model]

WL = WorkloadConfig(seed=3, conversations=2, turns=3, tool_chars=400, concurrency=1, system_prompts=2,
                    system_chars=1000, users=3, max_tokens=16, timeout=120.0)


@pytest.fixture(scope="module")
def both(artifact_path, tmp_path_factory):
    model = hf_model()
    tmp = tmp_path_factory.mktemp("control")
    return {b: control_run(b, model, str(artifact_path), tmp, WL) for b in ("vanilla", "kvtc")}


def test_kvtc_backend_is_the_one_serving(both):
    assert TREE_CACHE_LINE in both["kvtc"][1]
    assert TREE_CACHE_LINE not in both["vanilla"][1]


def test_generations_and_cached_tokens_identical(both):
    assert_identical(both["vanilla"][0], both["kvtc"][0])


def test_no_scheduler_error(both):
    for backend, (_results, log) in both.items():
        assert scheduler_errors(log) == [], backend
