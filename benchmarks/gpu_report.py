"""The GPU check's processes and its report: each test file or benchmark phase in its own process group,
stopped at its step's deadline (what it produced so far is kept), and one JSON plus one markdown report."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERBOSE_LINE = re.compile(r"(tests/\S+?::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)|"
                          r"(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(tests/\S+?::\S+)")  # fmt: skip


def run_proc(cmd: list[str], env: dict, timeout: float) -> dict:
    """Run ``cmd`` in its own process group; kill the group at ``timeout`` seconds. Output is kept either way."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=max(timeout, 1))
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        timed_out = True
    return {"returncode": proc.returncode, "timed_out": timed_out, "output": output or "",
            "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip


def run_pytest(args: list[str], env: dict, out: Path, end: float) -> dict:
    """One pytest process (``args``: options and one selection): counts, failures and skip reasons."""
    sel = Path(args[-1]).name
    xml = out / f"junit-{sel.split('::')[0].removesuffix('.py')}.xml"
    cmd = [sys.executable, "-m", "pytest", "-v", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}", *args]
    res = run_proc(cmd, env, end - time.monotonic())
    if res["returncode"] == 4 and "-n" in args and not res["timed_out"]:  # usage error: retry without xdist
        i = args.index("-n")
        return run_pytest(args[:i] + args[i + 2 :], env, out, end)
    entry = {"selection": sel, "returncode": res["returncode"], "timed_out": res["timed_out"],
             "seconds": res["seconds"], "args": args[:-1]}  # fmt: skip
    if xml.exists() and not res["timed_out"]:
        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        entry |= counts | {"passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}
        entry["failed_cases"] = [c.get("name") for c in suite.iter("testcase")
                                 if c.find("failure") is not None or c.find("error") is not None]  # fmt: skip
        entry["skip_reasons"] = sorted({s.get("message", "") for s in suite.iter("skipped")})
    else:  # stopped at the deadline: what the verbose lines say so far
        seen = {}
        for m in VERBOSE_LINE.finditer(res["output"]):
            seen[m.group(1) or m.group(4)] = m.group(2) or m.group(3)
        entry |= {"passed": sum(v in ("PASSED", "XFAIL") for v in seen.values()), "skipped": sum(
            v == "SKIPPED" for v in seen.values()), "failures": sum(v in ("FAILED", "XPASS") for v in seen.values()),
            "errors": sum(v == "ERROR" for v in seen.values()), "partial": True,
            "failed_cases": [k for k, v in seen.items() if v in ("FAILED", "ERROR", "XPASS")]}  # fmt: skip
    xml.unlink(missing_ok=True)
    entry["output_tail"] = res["output"][-3000:]
    return entry


def run_bench(cmd: list[str], env: dict, json_path: Path, end: float) -> dict:
    """One ``gpu_kernels.py`` process writing ``json_path``; its results, partial if it ran out of time."""
    json_path.unlink(missing_ok=True)
    res = run_proc([*cmd, "--json", str(json_path)], env, end - time.monotonic())
    entry = {k: res[k] for k in ("returncode", "timed_out", "seconds")} | {"output_tail": res["output"][-3000:]}
    if json_path.exists():
        entry["results"] = json.loads(json_path.read_text())["results"]
    return entry


def run_environment(cmd: list[str], env: dict, budget: float) -> dict:
    res = run_proc(cmd, env, budget)
    entry = {"seconds": res["seconds"], "status": "ok"}
    try:
        entry["environment"] = json.loads(res["output"].strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        entry |= {"status": "timed out" if res["timed_out"] else "failed", "error": res["output"][-2000:]}
    return entry


def status(entry: dict) -> str:
    """ok / failed / timed out / skipped (every test skipped) of a test or benchmark step."""
    runs = entry.get("tests") or ([entry["bench"]] if "bench" in entry else [])
    if any(r.get("timed_out") for r in runs):
        return "timed out"
    if any(r.get("failures") or r.get("errors") or r.get("returncode") not in (0, 5) for r in runs):
        return "failed"
    if entry.get("tests") and all(r.get("skipped", 0) == r.get("tests", -1) for r in runs):
        return "skipped"
    return "ok"


def _summary(step: dict) -> str:
    if "tests" in step:
        return "; ".join(f"{t['selection']}: {t.get('passed', '?')} passed, {t.get('failures', 0) + t.get('errors', 0)}"
                         f" failed, {t.get('skipped', '?')} skipped" + (" (stopped)" if t.get("timed_out") else "")
                         for t in step["tests"])  # fmt: skip
    if "bench" in step:
        rows = sum(len(r["rows"]) for r in step["bench"].get("results", []))
        return f"{rows} rows" + (" (stopped)" if step["bench"].get("timed_out") else "")
    return step.get("note", "")


def markdown(report: dict) -> str:
    env = report.get("environment", {})
    title = "SMOKE: CPU interpreter, figures meaningless" if report["mode"] == "smoke" else env.get("device")
    lines = [f"# GPU check ({title})", "",
             f"`{report['command']}`, {report['date']}; {report.get('elapsed_s', '?')} s of {report['budget_s']} s; "
             f"python {env.get('python')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), triton "
             f"{env.get('triton')}; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in
                                                  env.get("packages", {}).items()), "",
             "| # | step | measures | budget s | took s | status | result |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for i, s in enumerate(report["steps"]):
        lines.append(f"| {i} | {s['step']} | {s['measures']} | {s['budget_s']} | {s.get('seconds', '')} | "
                     f"{s['status']} | {_summary(s)} |")  # fmt: skip
    for s in report["steps"]:
        notes = [f"- {t['selection']}: FAILED {', '.join(t['failed_cases'])}" for t in s.get("tests", [])
                 if t.get("failed_cases")]  # fmt: skip
        notes += [f"- {t['selection']}: skipped: {r}" for t in s.get("tests", []) for r in t.get("skip_reasons", [])]
        tables = [r.get("markdown") or json.dumps(r["rows"]) for r in s.get("bench", {}).get("results", [])]
        if s.get("bench") and not tables:
            tables = ["```", s["bench"]["output_tail"][-1500:], "```"]
        if notes or tables:
            lines += ["", f"## {s['step']}", "", *notes, *(["", *tables] if tables else [])]
    lines += ["", f"**{'OK' if report.get('ok') else 'FAILED' if 'ok' in report else 'RUNNING'}**"]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(report))
