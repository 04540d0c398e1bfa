"""Helpers of the real-server tests (``tests/test_server_*.py``): model export, server runs, log checks."""

from __future__ import annotations

import re
from pathlib import Path

from kvtc_sglang.serve.bench import parse_metrics
from kvtc_sglang.serve.launcher import ServerSpec
from kvtc_sglang.serve.server import SGLangServer

REPO = Path(__file__).resolve().parents[1]
HF_DIR = REPO / "artifacts" / "hf" / "smollm2-135m-instruct"
START_TIMEOUT = 400.0
# Lines that mean the scheduler failed; SGLang's start-up "Ignore import error when loading <model>" lines
# (optional model files on CPU) are not failures.
_BAD = re.compile(r"Traceback|memory leak|double free|use-after-free|Scheduler hit an exception|RuntimeError")


def hf_model() -> str:
    from kvtc_sglang.serve.export import export_default_model

    return str(export_default_model(HF_DIR))


def start(spec: ServerSpec, log: Path) -> SGLangServer:
    env = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}  # SGLang's idle leak check raises (the default)
    return SGLangServer(spec, log, start_timeout=START_TIMEOUT, env=env).start()


def scheduler_errors(log_text: str) -> list[str]:
    return [line for line in log_text.splitlines() if _BAD.search(line)]


def kvtc_metrics(server: SGLangServer) -> dict[str, float]:
    return parse_metrics(server.get("/metrics")[1])
