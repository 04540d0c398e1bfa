#!/usr/bin/env bash
# GPU evidence in one command (benchmarks/gpu_check.py): at most 8 minutes, the most valuable steps first,
# a budget per step and a timeout per test; one JSON and one markdown report in $OUT (else out/gpu_check/).
#   bash scripts/gpu_check.sh BUNDLE              # on the lent GPU machine (its image's python3, 3.12)
#   bash scripts/gpu_check.sh BUNDLE --dry-run    # here, on a CPU (CI): bundle, imports, collection, budgets
#   bash scripts/gpu_check.sh BUNDLE --smoke      # here: the real steps under TRITON_INTERPRET=1, toy sizes
# BUNDLE is made by benchmarks/gpu_bundle.py; its wheels/ (Python 3.12) are installed into a scratch folder
# with pip --no-index (the machine reaches no index), else unpacked, and put on PYTHONPATH.
set -euo pipefail
export KVTC_GPU_CHECK_START=$(date +%s)  # the 480 s budget counts from here
BUNDLE=${1:?usage: scripts/gpu_check.sh BUNDLE [--dry-run | --smoke] [gpu_check.py options]}
shift
[ -d "$BUNDLE" ] && BUNDLE=$(cd "$BUNDLE" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python  # the CPU install (never carried)
case " $* " in *" --dry-run "*) DRY=1 ;; *) DRY=0 ;; esac
if [ "$DRY" = 0 ] && compgen -G "$BUNDLE/wheels/*.whl" >/dev/null; then
    SITE=${TMPDIR:-/tmp}/kvtc-gpu-site
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target "$SITE" "$BUNDLE"/wheels/*.whl ||
        "$PY" -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in sys.argv[2:]]' \
            "$SITE" "$BUNDLE"/wheels/*.whl
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
exec "$PY" benchmarks/gpu_check.py --bundle "$BUNDLE" "$@"
