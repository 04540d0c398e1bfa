#!/usr/bin/env bash
# GPU evidence in one command (see benchmarks/gpu_check.py): every GPU test and benchmark, one JSON and one
# markdown report in $OUT (else out/gpu_check/). Usage, from anywhere:
#   bash scripts/gpu_check.sh BUNDLE [--tokens 1024 4096 8192 32768] [--precisions ieee tf32x3 tf32]
# BUNDLE is made by benchmarks/gpu_bundle.py; wheels in BUNDLE/wheels/ are installed into /tmp first.
set -euo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${1:?usage: scripts/gpu_check.sh BUNDLE [gpu_check.py options]}
shift
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if compgen -G "$BUNDLE/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/kvtc-gpu-site "$BUNDLE"/wheels/*.whl
    export PYTHONPATH=/tmp/kvtc-gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
exec "$PY" benchmarks/gpu_check.py --bundle "$BUNDLE" "$@"
