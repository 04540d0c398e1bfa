"""GPU evidence in one command, built for the lent machine (``benchmarks/gpu_image.py``): at most 8 minutes,
the most valuable measurements first, a time budget per step and a timeout per test, one JSON and one
markdown report in ``$OUT`` (else ``out/gpu_check/``), rewritten after every step.

Here (the CPU install): make the bundle, then prove the run with a dry run (also in CI)::

    python benchmarks/gpu_bundle.py --out gpu_bundle
    bash scripts/gpu_check.sh gpu_bundle --dry-run

There (repository root, ``gpu_bundle`` carried)::

    bash scripts/gpu_check.sh gpu_bundle

Steps, in :data:`PLAN` order, each in its own processes (a failure or a timeout is recorded and the next step
still runs): the environment; Triton kernels against their torch references; kernel throughput against the
roofline; nvCOMP <-> zlib interoperation; nvCOMP throughput; restore against prefill; the stream-race tests
on SGLang's classes (these skip unless SGLang travels). ``--dry-run`` runs on a CPU: it checks the bundle
(``gpu_bundle.validate``), imports what the run imports and collects every test file it runs under the
image's import guard, and checks the plan's budgets. ``--smoke`` runs the real steps on the CPU under
``TRITON_INTERPRET=1`` at toy sizes (figures meaningless). Exit 2: no CUDA, or not a bundle; 1: a step
failed or ran out of time (or the dry run found a problem); else 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# a gpu_bundle/ folder in the checkout makes ruff sort gpu_bundle as first party: keep this order
# isort: off
import gpu_bundle  # noqa: E402
import gpu_report  # noqa: E402

# isort: on

ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 480  # the whole command, setup included
SETUP_S = 20  # scripts/gpu_check.sh: the carried wheels installed (pip --no-index --target), interpreter start
TOKENS = (1024, 4096, 8192, 32768)
PRECISIONS = ("ieee", "tf32x3", "tf32")
REQUIRED_CARRIED = ("nvidia.nvcomp",)  # the bundle must carry these (steps nvcomp, nvcomp_throughput, restore)
SMOKE_SLACK = 4  # the CPU interpreter is slow: smoke budgets are this many times the device's


@dataclass(frozen=True)
class Step:
    name: str
    measures: str
    budget_s: int
    tests: tuple[str, ...] = ()  # test files under tests/, one pytest process each
    test_timeout_s: int = 0  # pytest-timeout per test (the step's budget bounds the process anyway)
    workers: int = 0  # pytest-xdist workers (Triton compiles on the CPU cores in parallel)
    phase: str = ""  # benchmarks/gpu_kernels.py --phase
    needs: tuple[str, ...] = ()  # modules without which there is nothing to measure (tests then skip)
    imports: tuple[str, ...] = ()  # what its processes import beyond the tests (checked by the dry run)
    smoke: tuple[str, ...] = ()  # --smoke: the test selection run on the CPU (none: tests not run)


PLAN = (
    Step("environment", "device name, memory, SMs, driver; Python, torch, CUDA, Triton; importable packages", 30,
         imports=("torch", "triton")),
    Step("kernels", "Triton kernels compiled (TRITON_INTERPRET unset) against their torch references: project, "
         "quant_pack, decode_into, the codec's Triton path on paged pool rows; torch CRC-32 on CUDA = zlib", 150,
         tests=("test_triton_kernels.py", "test_codec_triton.py", "test_crc.py"), test_timeout_s=60, workers=4,
         smoke=("test_triton_kernels.py::test_bad_inputs_are_refused_with_the_expected_values",)),
    Step("roofline", "encode / decode kernel ms, GB/s and fraction of the roofline at 1K-32K tokens, "
         "dot precisions ieee, tf32x3, tf32", 60, phase="kernels", imports=("gpu_kernels",)),
    Step("nvcomp", "nvCOMP's stream inflated by zlib and zlib's by nvCOMP, GPU payload = CPU payload, a corrupt "
         "chunk caught before nvCOMP, nvCOMP on a side stream = default stream; the stream rules on real streams "
         "without SGLang (a restore and a put beside a sleeping forward: its late writes lose, its next read "
         "waits, neither call waits on it, no host sync in their row writes)", 60,
         tests=("test_gpu.py", "test_nvcomp_stream.py", "test_gpu_streams.py"), test_timeout_s=30,
         needs=("nvidia.nvcomp",),
         smoke=("test_nvcomp_stream.py::test_one_codec_per_device_and_stream",)),
    Step("nvcomp_throughput", "nvCOMP deflate / inflate GB/s of the payload, its ratio, its share of a whole "
         "encode and a whole restore, 1K-32K tokens", 30, phase="nvcomp", needs=("nvidia.nvcomp",)),
    Step("restore_vs_prefill", "restore (CRC, nvCOMP inflate, decode kernel into paged pool rows) against the "
         "prefill of SmolLM2-135M's architecture (transformers, random weights, SDPA), 1K-32K tokens", 80,
         phase="restore", needs=("nvidia.nvcomp",), imports=("transformers:LlamaForCausalLM",)),
    Step("sglang_streams", "the stream-race tests on SGLang's classes: the controller's fence rules, background "
         "encodes and restores, FlashInfer reading restored pages (skipped unless SGLang travels)", 40,
         tests=("test_stream_order.py", "test_background.py", "test_gpu_flashinfer.py"), test_timeout_s=30,
         needs=("sglang",)),
)  # fmt: skip


def plan_problems(plan: tuple[Step, ...] = PLAN) -> list[str]:
    """Why the plan could not finish in :data:`TOTAL_BUDGET_S` (empty when it can)."""
    total = SETUP_S + sum(s.budget_s for s in plan)
    problems = [] if total <= TOTAL_BUDGET_S else [f"steps' budgets sum to {total} s, over {TOTAL_BUDGET_S} s"]
    for s in plan:
        if s.tests and not 0 < s.test_timeout_s <= s.budget_s:
            problems.append(f"{s.name}: per-test timeout {s.test_timeout_s} s not within its {s.budget_s} s budget")
        problems += [f"{s.name}: tests/{t} does not exist" for t in s.tests if not (ROOT / "tests" / t).is_file()]
    return problems


def environment() -> dict:
    """What the machine is (run in its own process by the environment step)."""
    import platform  # noqa: PLC0415
    import shutil  # noqa: PLC0415
    import subprocess  # noqa: PLC0415

    import torch  # noqa: PLC0415

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(), "device": None,
           "packages": {m: importlib.util.find_spec(m.split(".")[0]) is not None and importlib.util.find_spec(m)
                        is not None for m in ("triton", "nvidia.nvcomp", "sglang", "flashinfer", "transformers",
                                              "pytest_timeout", "xdist", "cupy", "jax")}}  # fmt: skip
    env["packages"] = {k: bool(v) for k, v in env["packages"].items()}
    if importlib.util.find_spec("triton"):
        import triton  # noqa: PLC0415

        env["triton"] = triton.__version__
    if torch.cuda.is_available():
        prop = torch.cuda.get_device_properties(0)
        env |= {"device": prop.name, "memory_gib": round(prop.total_memory / (1 << 30), 1),
                "sms": prop.multi_processor_count, "capability": f"{prop.major}.{prop.minor}"}  # fmt: skip
        if shutil.which("nvidia-smi"):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                  "--format=csv,noheader"], capture_output=True, text=True, check=False)  # fmt: skip
            env["nvidia_smi"] = smi.stdout.strip()
    return env


def test_args(step: Step, smoke: bool) -> list[list[str]]:
    """One pytest argument list per selection of ``step``."""
    sels = step.smoke if smoke else step.tests
    timeout = importlib.util.find_spec("pytest_timeout") is not None
    xdist = step.workers and not smoke and importlib.util.find_spec("xdist") is not None
    return [[*([f"--timeout={step.test_timeout_s}"] if timeout and step.test_timeout_s else []),
             *(["-n", str(step.workers)] if xdist and "::" not in sel else []), str(ROOT / "tests" / sel)]
            for sel in sels]  # fmt: skip


def run_step(step: Step, args: argparse.Namespace, env: dict, out: Path, deadline: float) -> dict:
    budget = step.budget_s * (SMOKE_SLACK if args.smoke else 1)
    end = min(time.monotonic() + budget, deadline)
    entry: dict = {"step": step.name, "measures": step.measures, "budget_s": budget}
    t0 = time.monotonic()
    missing = [m for m in step.needs if not env.get("packages", {}).get(m, False)]
    if step.phase and missing and not args.smoke:
        return entry | {"status": "skipped", "note": f"needs {', '.join(missing)} (not carried)", "seconds": 0.0}
    if step.tests:
        entry["tests"] = [gpu_report.run_pytest(a, env_vars(args), out, end) for a in test_args(step, args.smoke)]
        if not entry["tests"]:
            return entry | {"status": "not run", "note": "no smoke selection", "seconds": 0.0}
    elif step.phase:
        tokens, precisions = ([16], ["ieee"]) if args.smoke else (args.tokens, args.precisions)
        cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_kernels.py"), "--bundle", str(args.bundle), "--phase",
               step.phase, "--tokens", *map(str, tokens), "--repeat", str(1 if args.smoke else args.repeat),
               "--precision", *(precisions if step.phase == "kernels" else precisions[:1]),
               *(["--smoke"] if args.smoke else [])]  # fmt: skip
        entry["bench"] = gpu_report.run_bench(cmd, env_vars(args), out / f"bench-{step.phase}.json", end)
    entry["seconds"] = round(time.monotonic() - t0, 1)
    return entry | {"status": gpu_report.status(entry), **({"note": f"needs {', '.join(missing)}"} if missing else {})}


def env_vars(args: argparse.Namespace) -> dict:
    env = dict(os.environ, KVTC_GPU_BUNDLE=str(args.bundle.resolve()), HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
    if args.smoke:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels
    return env


def run(args: argparse.Namespace, argv: list[str]) -> int:
    start = float(os.environ.get("KVTC_GPU_CHECK_START") or time.time())  # set by scripts/gpu_check.sh
    deadline = time.monotonic() + TOTAL_BUDGET_S * (SMOKE_SLACK if args.smoke else 1) - (time.time() - start)
    out = args.out or Path(os.environ.get("OUT") or ROOT / "out" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    env_cmd = [sys.executable, str(Path(__file__).resolve()), "--environment"]
    first = gpu_report.run_environment(env_cmd, env_vars(args), PLAN[0].budget_s)
    if not args.smoke and not first.get("environment", {}).get("cuda_available"):
        print("gpu_check needs a CUDA GPU and found none (torch.cuda.is_available() is False); on a CPU, "
              f"--dry-run checks the run and --smoke the script ({first.get('error', '')})",
              file=sys.stderr)  # fmt: skip
        return 2
    report = {"command": " ".join(["gpu_check.py", *argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S UTC",
              time.gmtime()), "mode": "smoke" if args.smoke else "gpu", "budget_s": TOTAL_BUDGET_S,
              "environment": first.get("environment", {}), "steps": [first | {"step": PLAN[0].name,
              "measures": PLAN[0].measures, "budget_s": PLAN[0].budget_s}]}  # fmt: skip
    for step in PLAN[1:]:
        if args.steps and step.name not in args.steps:
            continue
        if deadline - time.monotonic() < 5:
            report["steps"].append({"step": step.name, "measures": step.measures, "budget_s": step.budget_s,
                                    "status": "not run", "note": "out of time", "seconds": 0.0})  # fmt: skip
        else:
            report["steps"].append(run_step(step, args, report["environment"], out, deadline))
        report["elapsed_s"] = round(time.time() - start, 1)
        gpu_report.write(report, out)
    report["ok"] = all(s["status"] in ("ok", "skipped", "not run") for s in report["steps"])
    report["ok"] = report["ok"] and not any(s.get("note") == "out of time" for s in report["steps"])
    gpu_report.write(report, out)
    print((out / "gpu_check.md").read_text())
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="folder made by benchmarks/gpu_bundle.py")
    p.add_argument("--out", type=Path, help="report folder (default: $OUT, else out/gpu_check)")
    p.add_argument("--tokens", type=int, nargs="+", default=list(TOKENS))
    p.add_argument("--precisions", nargs="+", default=list(PRECISIONS))
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--steps", nargs="+", choices=[s.name for s in PLAN[1:]], help="only these steps (a rerun)")
    p.add_argument("--dry-run", action="store_true", help="on a CPU: bundle, imports, collection, budgets")
    p.add_argument("--budget-mib", type=float, default=gpu_bundle.TRANSFER_MIB, help="--dry-run: transfer limit")
    p.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, toy sizes: checks the script")
    p.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.environment:
        print(json.dumps(environment()))
        return 0
    if args.bundle is None:
        p.error("--bundle is required")
    if args.dry_run:
        import gpu_dryrun  # noqa: PLC0415

        return gpu_dryrun.main(args.bundle, args.out, args.budget_mib)
    missing = [n for n in gpu_bundle.REQUIRED if not (args.bundle / n).is_file()]
    if missing or not list(args.bundle.glob("*.kvtc.safetensors")):
        print(f"{args.bundle} is not a bundle (missing {', '.join(missing) or '*.kvtc.safetensors'}): make it with "
              "python benchmarks/gpu_bundle.py", file=sys.stderr)  # fmt: skip
        return 2
    return run(args, argv)


if __name__ == "__main__":
    sys.exit(main())

