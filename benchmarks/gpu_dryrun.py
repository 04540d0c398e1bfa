"""The GPU check's dry run, on a CPU (CI): would ``bash scripts/gpu_check.sh BUNDLE`` work on the lent machine?

(a) the bundle: ``gpu_bundle.validate`` (required files, the manifest's sizes and hashes, K/V against the
    artifact, wheels for CPython 3.12 manylinux x86-64, the modules the plan needs carried, working tree plus
    bundle within the 64 MiB the device takes);
(b) imports: in a fresh process under ``gpu_image``'s import guard, the bundle's wheels unpacked first on
    ``sys.path`` as the device installs them, import every module the run imports (carried native modules
    are resolved, not loaded: this CPU's Python is not 3.12) and collect every test file it runs; an import
    the image cannot satisfy fails it, and test files that need what does not travel must skip, not error;
(c) the plan: budgets, setup included, within 480 s; per-test timeouts within their step's budget.

Run as ``gpu_check.py --bundle B --dry-run``; writes ``gpu_check_dryrun.json`` and ``.md`` (``--out``, else
``$OUT``, else ``out/gpu_check``). Exit 1 on any problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import gpu_bundle
import gpu_check
import gpu_image

ROOT = gpu_check.ROOT
ALWAYS = ("gpu_check", "gpu_bundle", "gpu_image", "gpu_report")  # the orchestrator's own modules


def unpack_wheels(bundle: Path, dest: Path) -> dict[str, bool]:
    """Unpack the bundle's wheels into ``dest`` (``carried.json``: their modules); module -> has native code."""
    dest.mkdir(parents=True, exist_ok=True)
    carried: dict[str, bool] = {}
    for whl in sorted(bundle.glob("wheels/*.whl")):
        with zipfile.ZipFile(whl) as zf:
            zf.extractall(dest)
            native = any(gpu_image.EXTENSION.search(n) for n in zf.namelist())
        carried |= dict.fromkeys(gpu_image.wheel_modules(whl), native)
    (dest / "carried.json").write_text(json.dumps(sorted(carried)))
    return carried


def guarded(bundle: Path, site: Path, *, imports: list[str], finds: list[str], tests: list[str],
            extra_first_party: tuple[Path, ...] = ()) -> dict:  # fmt: skip
    """Run ``gpu_image.py`` (imports, resolutions, ``pytest --collect-only``) under the guard; its JSON."""
    result = site.parent / "guard.json"
    first_party = [ROOT, ROOT / "tests", ROOT / "benchmarks", *extra_first_party]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_image.py"), "--carried-dir", str(site), "--json",
           str(result), "--first-party", *map(str, first_party), "--import", *imports, "--find", *finds,
           "--collect", *(str(ROOT / "tests" / t) for t in tests)]  # fmt: skip
    env = dict(os.environ, KVTC_GPU_BUNDLE=str(bundle.resolve()), HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", PYTHONPATH=os.pathsep.join(map(str, first_party)))  # fmt: skip
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    if not result.exists():
        return {"error": f"the guarded process failed (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-3000:]}"}
    return json.loads(result.read_text()) | {"returncode": proc.returncode, "output_tail": proc.stdout[-2000:]}


def problems_of(guard: dict, tests: list[str]) -> list[str]:
    if "error" in guard:
        return [guard["error"]]
    problems = [f"import {k} fails with the image's packages plus the carried wheels: {v['error']}"
                for k, v in guard["imports"].items() if not v["ok"]]  # fmt: skip
    files = guard["collect"].get("files", {})
    for t in tests:
        got = files.get(f"tests/{t}")
        if got is None:
            problems.append(f"tests/{t} was not collected")
        elif got["outcome"] == "failed":
            problems.append(f"tests/{t} does not collect with the image's packages plus the carried wheels: "
                            f"{got.get('detail', '')[-600:]}")  # fmt: skip
    if guard["collect"].get("returncode") not in (0, 5):
        problems.append(f"pytest --collect-only exited {guard['collect'].get('returncode')}")
    return problems


def markdown(rep: dict) -> str:
    b = rep["bundle"]
    wheels = [f"{k} ({v['bytes'] / gpu_bundle.MIB:.1f} MiB: {', '.join(v['modules'])})" for k, v in b["wheels"].items()]
    lines = [f"# GPU check dry run: {'OK' if rep['ok'] else 'FAILED'}", "",
             f"Bundle `{b['bundle']}`: {b.get('bundle_bytes', 0) / gpu_bundle.MIB:.1f} MiB + working tree "
             f"{b.get('tree_bytes', 0) / gpu_bundle.MIB:.1f} MiB = {b.get('total_mib')} MiB of {rep['budget_mib']:g}; "
             f"wheels: {'; '.join(wheels) or 'none'}", "",
             "| step | budget s | per-test timeout s | tests | needs |", "|---|---|---|---|---|"]  # fmt: skip
    for s in gpu_check.PLAN:
        lines.append(f"| {s.name} | {s.budget_s} | {s.test_timeout_s or '-'} | {', '.join(s.tests) or s.phase} | "
                     f"{', '.join(s.needs) or '-'} |")  # fmt: skip
    lines += [f"| setup (scripts/gpu_check.sh) | {gpu_check.SETUP_S} | | | |",
              f"| **total** | **{rep['planned_s']}** of {gpu_check.TOTAL_BUDGET_S} | | | |", ""]
    guard = rep.get("guard", {})
    for name, res in guard.get("imports", {}).items():
        lines.append(f"- import `{name}`: {'ok' if res['ok'] else res['error']}")
    for name, res in guard.get("collect", {}).get("files", {}).items():
        detail = res.get("detail", "").strip().splitlines()[-1:] if res["outcome"] != "passed" else []
        lines.append(f"- collect `{name}`: {res['outcome']}, {res['tests']} tests {' '.join(detail)}")
    lines += [f"- refused: `{r['module']}`: {r['reason']}" for r in guard.get("refused", [])]
    lines += ["", *(f"**problem**: {p}" for p in rep["problems"])]
    return "\n".join(lines) + "\n"


def main(bundle: Path, out: Path | None, budget_mib: float = gpu_bundle.TRANSFER_MIB, *,
         extra_imports: tuple[str, ...] = (), extra_first_party: tuple[Path, ...] = ()) -> int:  # fmt: skip
    out = out or Path(os.environ.get("OUT") or ROOT / "out" / "gpu_check")
    out.mkdir(parents=True, exist_ok=True)
    needed = sorted({m for s in gpu_check.PLAN for m in s.needs})
    rep: dict = {"mode": "dry-run", "budget_mib": budget_mib,
                 "bundle": gpu_bundle.validate(bundle, budget_mib, gpu_check.REQUIRED_CARRIED),
                 "planned_s": gpu_check.SETUP_S + sum(s.budget_s for s in gpu_check.PLAN)}  # fmt: skip
    problems = list(rep["bundle"]["problems"]) + gpu_check.plan_problems()
    tests = [t for s in gpu_check.PLAN for t in s.tests]
    imports = [*ALWAYS, *(m for s in gpu_check.PLAN for m in s.imports), *extra_imports]
    if bundle.is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            carried = unpack_wheels(bundle, Path(tmp) / "site")
            travels = [m for m in needed if m in carried]
            rep["guard"] = guarded(bundle, Path(tmp) / "site", tests=tests, extra_first_party=extra_first_party,
                                   imports=imports + [m for m in travels if not carried[m]],
                                   finds=[m for m in travels if carried[m]])  # fmt: skip
        rep["not_carried"] = [m for m in needed if m not in carried]
        problems += problems_of(rep["guard"], tests)
    rep["problems"], rep["ok"] = problems, not problems
    (out / "gpu_check_dryrun.json").write_text(json.dumps(rep, indent=1, default=str))
    (out / "gpu_check_dryrun.md").write_text(markdown(rep))
    print(markdown(rep))
    print(f"wrote {out / 'gpu_check_dryrun.json'} and {out / 'gpu_check_dryrun.md'}")
    return 0 if rep["ok"] else 1
