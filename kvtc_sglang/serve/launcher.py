"""Build the stock ``sglang.launch_server`` command (and its environment) for the kvtc or vanilla backend.

On a machine without CUDA the server runs SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``, ``--device
cpu --attention-backend torch_native --dtype float32 --kv-cache-dtype bfloat16 --sleep-on-idle``, a bounded
``--max-total-tokens``; the model computes in fp32 because bf16 matmuls are about 6x slower than fp32 on a
CPU without AVX512-BF16/AMX, measured here, while the KV cache stays bf16, what the calibration is for)
with the CPU ``sgl_kernel`` shim on ``PYTHONPATH`` (only when no real ``sgl_kernel`` is importable). On a
GPU machine nothing is added: SGLang's defaults apply. Flags the caller gives win over these defaults.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..calibration.fit import artifact_name
from ..calibration.model import DEFAULT_MODEL
from ..codec.tp import rank_artifact_path

SHIM_DIR = Path(__file__).resolve().parent / "cpu_shim"
BACKENDS = ("kvtc", "vanilla")
CPU_MAX_TOTAL_TOKENS = 16384  # default pool on CPU (SGLang would size it from host memory: ~630k tokens)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def real_sgl_kernel_available() -> bool:
    """A ``sgl_kernel`` importable without our shim (checked without importing it)."""
    spec = importlib.util.find_spec("sgl_kernel")
    return spec is not None and not (spec.origin or "").startswith(str(SHIM_DIR))


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def flag_value(args: list[str], flag: str) -> str | None:
    """Value of ``flag`` in an argument list (``--f v`` or ``--f=v``), last one wins; ``None`` if absent."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


@dataclass(frozen=True)
class ServerSpec:
    """What to launch.

    Attributes:
        backend: ``kvtc`` or ``vanilla`` (SGLang's own radix cache).
        model_path: HF checkpoint directory (or hub id) for ``--model-path``.
        calibration: kvtc calibration artifact (needed for ``kvtc`` unless ``extra`` has ``--kvtc-calibration``).
        cpu: CPU engine settings and shim; ``None``: decide by ``torch.cuda.is_available()``.
        max_total_tokens: ``--max-total-tokens`` on CPU when ``extra`` has none.
        extra: any other SGLang flags, passed through last (they win over the defaults here).
    """

    backend: str
    model_path: str
    calibration: str | None = None
    cpu: bool | None = None
    max_total_tokens: int = CPU_MAX_TOTAL_TOKENS
    extra: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.max_total_tokens < 1:
            raise ValueError(f"max_total_tokens must be >= 1, got {self.max_total_tokens}")

    @property
    def on_cpu(self) -> bool:
        return (not cuda_available()) if self.cpu is None else self.cpu


def server_command(spec: ServerSpec, host: str, port: int) -> list[str]:
    """``python -m sglang.launch_server ...`` for ``spec``."""
    extra = list(spec.extra)
    cmd = [sys.executable, "-m", "sglang.launch_server", "--host", host, "--port", str(port)]
    if not _has_flag(extra, "--model-path"):
        cmd += ["--model-path", spec.model_path]
    if spec.backend == "kvtc":
        if not _has_flag(extra, "--kv-backend") and not _has_flag(extra, "--radix-cache-backend"):
            cmd += ["--kv-backend", "kvtc"]
        if not _has_flag(extra, "--kvtc-calibration"):
            if spec.calibration is None:
                raise ValueError("the kvtc backend needs a calibration: give --kvtc-calibration PATH")
            cmd += ["--kvtc-calibration", spec.calibration]
    if spec.on_cpu:
        defaults = [("--device", "cpu"), ("--attention-backend", "torch_native"), ("--dtype", "float32"),
                    ("--kv-cache-dtype", "bfloat16"), ("--max-total-tokens", str(spec.max_total_tokens))]
        for flag, value in defaults:
            if not _has_flag(extra, flag):
                cmd += [flag, value]
        if not _has_flag(extra, "--sleep-on-idle"):
            cmd.append("--sleep-on-idle")
    return cmd + extra


TP_FLAGS = ("--tp-size", "--tp", "--tensor-parallel-size")  # SGLang's spellings of one option


def tp_size_of(args: list[str]) -> int:
    """The ``--tp-size`` an SGLang argument list asks for (1 when absent)."""
    values = [v for f in TP_FLAGS if (v := flag_value(args, f)) is not None]
    if not values:
        return 1
    try:
        tp = int(values[-1])
    except ValueError:
        raise ValueError(f"--tp-size must be an integer, got {values[-1]!r}") from None
    if tp < 1:
        raise ValueError(f"--tp-size must be >= 1, got {tp}")
    return tp


def cpu_thread_binding(tp_size: int, cpus: list[int] | None = None) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` for ``tp_size`` CPU ranks: this process's cores split into that many
    contiguous groups (``"0|1"`` for 2 ranks on 2 cores). SGLang's ``init_threads_binding`` needs it on a
    machine with fewer NUMA nodes than ranks."""
    cores = sorted(os.sched_getaffinity(0)) if cpus is None else sorted(cpus)
    if len(cores) < tp_size:
        raise ValueError(f"--tp-size {tp_size} on the CPU needs {tp_size} cores or more, this process has {len(cores)}")
    per = len(cores) // tp_size
    groups = [cores[r * per : (r + 1) * per] for r in range(tp_size)]
    return "|".join(",".join(str(c) for c in g) for g in groups)


def server_env(spec: ServerSpec, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the server process: CPU engine and the ``sgl_kernel`` shim on a CPU machine; at
    ``--tp-size N > 1`` on the CPU also what SGLang 0.5.23's CPU tensor parallelism needs here (each is set only
    when the caller has not set it):

    - ``SGLANG_CPU_OMP_THREADS_BIND``: one group of cores per rank (:func:`cpu_thread_binding`);
    - ``SGLANG_NCCL_SO_PATH`` pointing at no file: the pinned torch is a CUDA build whose ``libnccl`` loads, and
      0.5.23's CPU platform still asks for a PyNccl communicator, which then needs a CUDA device; with no
      library SGLang takes its own no-NCCL path and the ranks talk over gloo;
    - ``SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK=0``: the start-up check compares host memory the ranks see,
      which a busy machine trips.
    """
    env = dict(os.environ if base is None else base)
    env.setdefault("HF_HUB_OFFLINE", "1")
    if spec.on_cpu:
        if cuda_available():
            raise RuntimeError("CPU serving was asked for on a CUDA machine; the sgl_kernel shim is CPU-only")
        env["SGLANG_USE_CPU_ENGINE"] = "1"
        if not real_sgl_kernel_available():
            parts = [str(SHIM_DIR), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
            env["PYTHONPATH"] = os.pathsep.join(parts)
        tp = tp_size_of(spec.extra)
        if tp > 1:
            env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", cpu_thread_binding(tp))
            env.setdefault("SGLANG_NCCL_SO_PATH", NO_NCCL)
            env.setdefault("SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK", "0")
    return env


NO_NCCL = "/nonexistent/kvtc-cpu-tp/libnccl.so.2"  # see server_env


FULL_CALIBRATION_TOKENS = 100_000  # python -m kvtc_sglang.calibration's default


def calibration_path(artifacts: Path, tokens: int = FULL_CALIBRATION_TOKENS) -> Path:
    """Where the default model's r16 calibration on ``tokens`` tokens lives: ``artifacts/`` for the full
    calibration, ``artifacts/t<tokens>/`` for a smaller one (never mistaken for the full one)."""
    name = artifact_name(DEFAULT_MODEL, 16)
    return artifacts / name if tokens == FULL_CALIBRATION_TOKENS else artifacts / f"t{tokens}" / name


def bench_calibration(given: Path | None, artifacts: Path, servers: list[str] | tuple[str, ...], prog: str) -> Path:
    """A benchmark's kvtc calibration: ``given``, else the full one in ``artifacts`` if it exists, else the main
    job's (``artifacts/t16384``); ``SystemExit`` naming it when a kvtc server needs it and it does not exist."""
    calibration = given
    if calibration is None:
        full = calibration_path(artifacts)
        calibration = full if full.is_file() else calibration_path(artifacts, 16384)
    if any(s not in {"vanilla", "big"} for s in servers) and not Path(calibration).is_file():
        raise SystemExit(f"{prog}: error: kvtc calibration {calibration} does not exist "
                         "(python -m kvtc_sglang makes one, or give --calibration)")
    return Path(calibration)


def prepare_default_model(artifacts: Path, *, calibrate: bool = True, tokens: int = FULL_CALIBRATION_TOKENS,
                          fisher_every: int = 1, tp_size: int = 1) -> tuple[Path, Path]:
    """Export the default model to ``artifacts/hf/`` and calibrate it at 16x on ``tokens`` tokens of real text
    if no such artifact exists yet (:func:`calibration_path`; the full calibration is used whenever it exists).

    Returns ``(hf_dir, calibration_path)``; the calibration runs ``python -m kvtc_sglang.calibration`` (about
    11 minutes for the full 100k tokens on a 2-core CPU; ``fisher_every``: its ``--fisher-every``) and is
    skipped when ``calibrate`` is false (the path may then not exist). At ``tp_size > 1`` it also writes each
    rank's artifact beside it (``--tp-sizes``) when one is missing.
    """
    from .export import export_default_model

    if tokens < 1:
        raise ValueError(f"calibration tokens must be >= 1, got {tokens}")
    if fisher_every < 1:
        raise ValueError(f"fisher_every must be >= 1, got {fisher_every}")
    hf = export_default_model(artifacts / "hf" / DEFAULT_MODEL)
    full = calibration_path(artifacts)
    cal = full if full.is_file() else calibration_path(artifacts, tokens)
    sizes = [] if cal.is_file() else [1]
    if tp_size > 1 and not all(rank_artifact_path(cal, tp_size, r).is_file() for r in range(tp_size)):
        sizes.append(tp_size)
    if calibrate and sizes:
        if cal == full:
            tokens = FULL_CALIBRATION_TOKENS  # the ranks' artifacts from as much text as the whole model's
        print(f"calibrating {DEFAULT_MODEL} at 16x on {tokens} tokens, tp sizes {sizes} -> {cal.parent} (once)",
              flush=True)
        cmd = [sys.executable, "-m", "kvtc_sglang.calibration", "--ratios", "16", "--tokens", str(tokens),
               "--fisher-every", str(fisher_every), "--tp-sizes", *map(str, sizes), "--out", str(cal.parent)]
        subprocess.run(cmd, check=True)
    return hf, cal
