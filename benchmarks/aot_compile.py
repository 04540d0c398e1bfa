"""Compile every Triton kernel variant ahead of time for sm_90 and sm_100, with no GPU, and report its resources.

The variants are :func:`kvtc_sglang.triton_kernels.aot.aot_specs` (the launchers' own meta-parameters and
tiles). For each kernel x variant x target it runs ``triton.compile(ASTSource(...), target=GPUTarget(...))``
in a fresh Triton cache and reads registers, spill stores/loads and stack from the ``ptxas -v`` log Triton's
own ptxas run writes (``knobs.nvidia.dump_ptxas_log``), shared memory, warps and stages from the metadata::

    python benchmarks/aot_compile.py --out results/aot           # everything (both targets)
    python benchmarks/aot_compile.py --cover --targets sm90      # the CI cover
    python benchmarks/aot_compile.py --triton-path /tmp/triton36 # with another Triton first on sys.path
    python benchmarks/aot_compile.py --only project/bf16/neox --set BLOCK_T=32  # try another tile

Writes ``aot_compile.json`` and ``aot_compile.md`` to ``--out``; exits 1 if any variant fails to compile.
The compile runs in a child process without ``TRITON_INTERPRET`` (and with ``--triton-path`` first on
``PYTHONPATH``) when either is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

CHILD_ENV = "KVTC_AOT_CHILD"
OPTIONS = ("num_warps", "num_stages")  # compile options --set may change besides the constexprs
COLUMNS = ("kernel", "variant", "target", "tile", "registers", "spill_stores", "spill_loads", "stack",
           "shared", "num_warps", "num_stages", "seconds")  # fmt: skip
_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def parse_ptxas(log: str) -> dict[str, int]:
    """Registers, stack and spill bytes of the (single) entry function in a ``ptxas -v`` log."""
    found = {k: [int(m) for m in rx.findall(log)] for k, rx in _PTXAS.items()}
    if any(len(v) != 1 for v in found.values()):
        raise RuntimeError(f"expected one entry function in the ptxas log, got {found}:\n{log}")
    return {k: v[0] for k, v in found.items()}


def parse_value(text: str) -> Any:
    """``--set`` values: ints, ``True``/``False``, else the string."""
    if text in ("True", "False"):
        return text == "True"
    try:
        return int(text)
    except ValueError:
        return text


def compile_one(index: int, target: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Compile spec ``index`` of :func:`aot_specs` for ``target``: a row of :data:`COLUMNS` (+ ``error``)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    from kvtc_sglang.triton_kernels.aot import TARGETS, aot_specs

    spec = aot_specs()[index]
    row: dict[str, Any] = {"kernel": spec.kernel, "variant": spec.variant, "target": target, "tile": spec.tile}
    if type(spec.fn).__name__ != "JITFunction":
        raise RuntimeError(f"kernels are {type(spec.fn).__name__}: import them without TRITON_INTERPRET")
    constexprs, options = dict(spec.constexprs), dict(spec.options)
    for key, value in overrides.items():
        if key not in constexprs and key not in OPTIONS:
            raise KeyError(f"--set {key}: {spec.kernel} has no constexpr {key} ({sorted(constexprs)})")
        (constexprs if key in constexprs else options)[key] = value
    row["tile"] = f"{constexprs['BLOCK_T']}x{constexprs.get('BLOCK_R', constexprs.get('BLOCK_C'))}"
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own `ptxas -v` log: what it really ran
    knobs.compilation.always_compile = True
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            src = triton.compiler.ASTSource(fn=spec.fn, signature=spec.signature, constexprs=constexprs)
            kernel = triton.compile(src, target=GPUTarget(*TARGETS[target]), options=options)
        row.update(parse_ptxas(log.getvalue()))
        meta = kernel.metadata
        row.update(shared=meta.shared, num_warps=meta.num_warps, num_stages=meta.num_stages, error=None)
    except Exception as e:  # reported per row; the run exits 1
        row["error"] = f"{type(e).__name__}: {str(e).strip()[:2000]}"
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _fmt(row: dict[str, Any], key: str) -> str:
    if row.get("error") and key not in ("kernel", "variant", "target", "tile", "seconds"):
        return "ERROR" if key == "registers" else ""
    value = row.get(key, "")
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """The table (one row per kernel x variant x target) and a summary of spills and errors."""
    lines = [f"Triton {header['triton']} ({header['triton_file']}), {len(rows)} compiles, "
             f"{header['compile_seconds']:.0f} s of compile time, {header['wall_seconds']:.0f} s wall "
             f"with {header['jobs']} jobs: `{header['command']}`", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]  # fmt: skip
    lines += ["| " + " | ".join(_fmt(r, c) for c in COLUMNS) + " |" for r in rows]
    spills = [r for r in rows if not r.get("error") and (r["spill_stores"] or r["spill_loads"])]
    errors = [r for r in rows if r.get("error")]
    lines += ["", f"Spilling: {len(spills)} of {len(rows)}" + "".join(
        f"\n- {r['kernel']}/{r['variant']} {r['target']}: {r['spill_stores']} B stores, {r['spill_loads']} B loads"
        for r in spills)]  # fmt: skip
    lines += [f"Errors: {len(errors)}"] + [f"- {r['kernel']}/{r['variant']} {r['target']}: "
                                           f"{r['error'].splitlines()[0]}" for r in errors]  # fmt: skip
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    import triton

    from kvtc_sglang.triton_kernels.aot import aot_specs, cover

    specs = aot_specs()
    chosen = cover(specs) if args.cover else specs
    chosen = [s for s in chosen if not args.only or any(o in s.name for o in args.only)]
    if not chosen:
        raise SystemExit(f"no variant matches {args.only}")
    overrides = dict(kv.split("=", 1) for kv in args.set)
    overrides = {k: parse_value(v) for k, v in overrides.items()}
    work = [(specs.index(s), t) for s in chosen for t in args.targets]
    t0 = time.perf_counter()
    if args.jobs > 1 and len(work) > 1:
        with ProcessPoolExecutor(min(args.jobs, len(work)), mp_context=get_context("spawn")) as pool:
            rows = list(pool.map(compile_one, *zip(*work, strict=True), [overrides] * len(work)))
    else:
        rows = [compile_one(i, t, overrides) for i, t in work]
    header = {
        "triton": triton.__version__,
        "triton_file": str(Path(triton.__file__).parent),
        "command": "python benchmarks/aot_compile.py " + " ".join(sys.argv[1:]),
        "jobs": args.jobs,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "compile_seconds": round(sum(r["seconds"] for r in rows), 1),
        "overrides": overrides,
    }
    text = markdown(rows, header)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "aot_compile.json").write_text(json.dumps({**header, "rows": rows}, indent=1) + "\n")
        (args.out / "aot_compile.md").write_text(text)
    return 1 if any(r.get("error") for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="folder for aot_compile.json and aot_compile.md")
    p.add_argument("--targets", nargs="+", default=["sm90", "sm100"], choices=["sm90", "sm100"])
    p.add_argument("--cover", action="store_true", help="a representative cover (CI) instead of every variant")
    p.add_argument("--only", nargs="+", default=[], help="variants whose kernel/variant name contains one of these")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="set a constexpr, num_warps, num_stages")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    p.add_argument("--triton-path", type=Path, help="folder holding another `triton` package, put first")
    args = p.parse_args(argv)
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if os.environ.get(CHILD_ENV) != "1" and (interpret or args.triton_path):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        paths = [str(Path(__file__).resolve().parents[1])]
        paths = [str(args.triton_path.resolve()), *paths] if args.triton_path else paths
        env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        env[CHILD_ENV] = "1"
        argv = sys.argv[1:] if argv is None else argv
        return subprocess.run([sys.executable, __file__, *argv], env=env, check=False).returncode
    with tempfile.TemporaryDirectory(prefix="kvtc-aot-cache-") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache  # fresh: every compile runs ptxas (and is timed) for real
        return run(args)


if __name__ == "__main__":
    sys.exit(main())
