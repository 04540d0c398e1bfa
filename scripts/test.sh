#!/usr/bin/env bash
# The project's checks: lint, types (mypy, files listed in pyproject.toml), then the test suite
# (GPU tests skip themselves without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
"$VENV/bin/ruff" check .
"$VENV/bin/python" -m mypy
"$VENV/bin/python" -m pytest -q --durations=40 tests
