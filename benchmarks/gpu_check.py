"""GPU evidence in one command: every GPU test and benchmark, one JSON and one markdown report.

Whoever gets a GPU runs it first. Here (with the model; the bundle must fit the device's 64 MiB transfer)::

    python benchmarks/gpu_bundle.py --artifact artifacts/smollm2-135m-instruct.r64.kvtc.safetensors --out gpu_bundle

There (the repository root, gpu_bundle beside it)::

    bash scripts/gpu_check.sh gpu_bundle          # -> $OUT/gpu_check.json and .md (else out/gpu_check/)

Steps, each recorded (a failure is reported, the next step still runs):

1. environment: device, torch, Triton, nvCOMP, FlashInfer, SGLang;
2. tests, kernels compiled (``TRITON_INTERPRET`` unset), ``KVTC_GPU_BUNDLE`` pointing at the bundle:
   ``test_triton_kernels`` and ``test_codec_triton`` (kernels against their torch references),
   ``test_gpu`` (nvCOMP <-> zlib both ways, GPU decode = CPU decode), ``test_gpu_flashinfer`` (FlashInfer's
   paged decode reading restored pages), ``test_crc`` (the torch CRC-32 on CUDA = zlib),
   ``test_nvcomp_stream`` (nvCOMP and the codec inside a non-default ``torch.cuda.Stream`` = default
   stream), ``test_stream_order`` (the controller's fence rules: every pool-row access of the codec ordered
   after the forward stream), ``test_background`` (background encodes and one-call restores, real SGLang
   classes),
   ``test_server_race`` (a real kvtc server, overlap scheduler on, ``--page-size 16``, forced retraction
   and priority preemption, every restored row checked against its reference: zero verify and checksum
   failures); passed / failed / skipped per file, with the skip reasons;
3. ``benchmarks/gpu_kernels.py`` once per dot precision at ``--tokens`` (1K/4K/8K/32K): encode/decode GB/s
   and roofline fraction, restore vs prefill recompute, nvCOMP share.

Without CUDA it refuses (exit 2). ``--smoke`` runs the same machinery on the CPU under
``TRITON_INTERPRET=1`` at toy sizes (one test selection, one precision, T=16, no prefill) to check the
script; its figures mean nothing. Exit status 1 if any test failed or any step broke, else 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_TESTS = ("test_triton_kernels.py", "test_codec_triton.py", "test_gpu.py", "test_gpu_flashinfer.py",
             "test_crc.py", "test_nvcomp_stream.py", "test_stream_order.py", "test_background.py",
             "test_server_race.py")  # fmt: skip
SMOKE_TESTS = ("test_triton_kernels.py::test_bad_inputs_are_refused_with_the_expected_values",)


def environment() -> dict:
    import torch  # noqa: PLC0415

    have = {name: importlib.util.find_spec(mod) is not None for name, mod in
            (("triton", "triton"), ("flashinfer", "flashinfer"), ("sglang", "sglang"))}  # fmt: skip
    have["nvcomp"] = importlib.util.find_spec("nvidia") is not None and (
        importlib.util.find_spec("nvidia.nvcomp") is not None
    )
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "packages": have,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }


def run_tests(selection: tuple[str, ...], bundle: Path, out: Path, smoke: bool) -> list[dict]:
    """Each test file (or node id) in its own pytest process: counts, failures and skip reasons."""
    env = dict(os.environ, KVTC_GPU_BUNDLE=str(bundle.resolve()), PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
    if smoke:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)  # compiled kernels
    results = []
    for sel in selection:
        xml = out / f"junit-{sel.split('::')[0].removesuffix('.py')}.xml"
        t0 = time.perf_counter()
        proc = subprocess.run(  # noqa: PLW1510 (the return code is recorded, not raised)
            [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}",
             str(ROOT / "tests" / sel)],
            cwd=ROOT, env=env, capture_output=True, text=True,
        )  # fmt: skip
        entry = {"selection": sel, "returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1)}
        if xml.exists():
            suite = ET.parse(xml).getroot()
            suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
            counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            entry |= counts | {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}
            entry["failed_cases"] = [c.get("name") for c in suite.iter("testcase")
                                     if c.find("failure") is not None or c.find("error") is not None]  # fmt: skip
            entry["skip_reasons"] = sorted({s.get("message", "") for s in suite.iter("skipped")})
            xml.unlink()
        entry["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
        results.append(entry)
    return results


def run_benchmarks(bundle: Path, tokens: list[int], precisions: list[str], repeat: int, smoke: bool) -> list[dict]:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_kernels  # noqa: PLC0415

    if smoke:
        gpu_kernels.use_cpu_for_smoke()
    results = []
    for precision in precisions:
        try:
            res = gpu_kernels.run(bundle, tokens, repeat, precision=precision, prefill=not smoke)
            results.append(res | {"markdown": gpu_kernels.markdown(res)})
        except (RuntimeError, ValueError, OSError, ImportError) as e:  # recorded: the other precisions still run
            results.append({"precision": precision, "error": f"{type(e).__name__}: {e}"})
    return results


def report_markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"# GPU check ({'SMOKE: CPU interpreter, figures meaningless' if report['smoke'] else env['device']})",
        "",
        f"`{report['command']}`, {report['date']}; python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}); "
        + ", ".join(f"{k} {'yes' if v else 'MISSING'}" for k, v in env["packages"].items()),
        "",
        "## Tests (kernels compiled)" if not report["smoke"] else "## Tests (interpreter)",
        "",
        "| tests | passed | failed | skipped | s | skip reasons / failures |",
        "|---|---|---|---|---|---|",
    ]
    for t in report["tests"]:
        notes = "; ".join(t.get("failed_cases", []) + t.get("skip_reasons", [])) or ""
        bad = t.get("failures", 0) + t.get("errors", 0) if "tests" in t else "?"
        counts = f"{t.get('passed', '?')} | {bad} | {t.get('skipped', '?')}"
        lines.append(f"| {t['selection']} | {counts} | {t['seconds']} | {notes} |")
    lines += ["", "## Kernels: throughput, roofline, restore vs prefill, nvCOMP share", ""]
    for b in report["benchmarks"]:
        lines += [f"### {b['precision']}", "", b.get("markdown") or f"ERROR {b['error']}", ""]
    lines.append(f"**{'OK' if report['ok'] else 'FAILED'}**")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="folder made by benchmarks/gpu_bundle.py")
    p.add_argument("--out", type=Path, help="report folder (default: $OUT, else out/gpu_check)")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192, 32768])
    p.add_argument("--precisions", nargs="+", default=["ieee", "tf32x3", "tf32"])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1, toy sizes: checks the script")
    args = p.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    import torch  # noqa: PLC0415

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU and found none (torch.cuda.is_available() is False); "
              "on a CPU, --smoke checks the script only", file=sys.stderr)  # fmt: skip
        return 2
    if not (args.bundle / "kv.safetensors").exists() or not list(args.bundle.glob("*.kvtc.safetensors")):
        print(f"{args.bundle} is not a bundle (needs kv.safetensors and one *.kvtc.safetensors): "
              "make it with benchmarks/gpu_bundle.py", file=sys.stderr)  # fmt: skip
        return 2
    out = args.out or Path(os.environ.get("OUT") or ROOT / "out" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    tokens, precisions = ([16], ["ieee"]) if args.smoke else (args.tokens, args.precisions)
    report = {
        "command": " ".join(["gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "smoke": args.smoke,
        "environment": environment(),
        "tests": run_tests(SMOKE_TESTS if args.smoke else GPU_TESTS, args.bundle, out, args.smoke),
        "benchmarks": run_benchmarks(args.bundle, tokens, precisions, 1 if args.smoke else args.repeat, args.smoke),
    }
    report["ok"] = all(t["returncode"] == 0 and "tests" in t for t in report["tests"]) and not any(
        "error" in b for b in report["benchmarks"]
    )
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(report_markdown(report))
    print(report_markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
