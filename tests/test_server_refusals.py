"""Start-up refusals through the real launcher (``python -m kvtc_sglang.serve``): one ``kvtc: error:`` line
naming the problem, a non-zero exit, before any model is loaded."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from serve_support import REPO, hf_model

pytestmark = [pytest.mark.server]


def _launch(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "kvtc_sglang.serve", "--port", "1", *args]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kvtc-calibration", "/nonexistent/x.kvtc.safetensors"], "x.kvtc.safetensors"),
        (["--backend", "vanilla", "--kvtc-idle-seconds", "5"], "--kvtc-idle-seconds given without --kv-backend"),
    ],
    ids=["missing-calibration", "kvtc-flag-on-vanilla"],
)
def test_refused_at_start_up(args, message):
    done = _launch(["--model-path", hf_model(), *args])
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("kvtc: error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert message in errors[0]


def test_pd_disaggregation_is_refused_at_start_up(artifact_path):
    """A prefill server sends pages as the forward writes them; kvtc never marks what SGLang's early-send check
    reads, so P/D disaggregation is refused before any model is loaded."""
    done = _launch(["--model-path", hf_model(), "--kvtc-calibration", str(artifact_path),
                    "--disaggregation-mode", "prefill"])  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("kvtc: error:")]
    assert len(errors) == 1, done.stderr[-2000:]
    assert "--disaggregation-mode prefill is not supported by kvtc" in errors[0]
