"""Where the scheduler process's CPU time goes, vanilla SGLang against kvtc, on the main job's workloads.

Starts each server (vanilla and kvtc at the same ``--max-total-tokens``, as the main job does), attaches py-spy to
its scheduler process (``py-spy record --threads --nonblocking --format raw``: samples of running threads only),
replays the main job's agent sessions (the ``trace.json`` a main-job run wrote) and its shared-system-prompt
workload (``--workloads``: also SGLang's own benchmark on an ``agentic_bench.py`` trace), then sums the samples
per thread (SGLang's scheduler thread, kvtc's encode worker) and per category
(:mod:`kvtc_sglang.serve.profile_stacks`: the forward, kvtc's codec, kvtc's tree work, SGLang's radix cache,
scheduling, request intake). On this CPU the forward runs on the scheduler thread, so every category is time
the scheduler could not spend on anything else::

    .venv/bin/python -m kvtc_sglang --out out/serve            # writes out/serve/trace.json (and calibrates)
    .venv/bin/python benchmarks/profile_scheduler.py --trace out/serve/trace.json \\
        --calibration artifacts/t16384/smollm2-135m-instruct.r16.kvtc.safetensors --out out/profile

Writes ``profile.md`` (a table per workload) and the raw stacks (``<workload>_<server>.stacks.txt``, for flame
graphs).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from kvtc_sglang.serve.bench import BenchConfig, server_spec
from kvtc_sglang.serve.launcher import prepare_default_model
from kvtc_sglang.serve.profile_stacks import parse_raw, profile_counts, profile_table
from kvtc_sglang.serve.server import SGLangServer
from kvtc_sglang.serve.session_bench import SessionBenchConfig, flush, shared_prompt_workload, standard_workloads
from kvtc_sglang.serve.workload import WorkloadConfig


def scheduler_pid(server_pid: int, timeout: float = 30.0) -> int:
    """The pid of SGLang's scheduler process (its title is ``sglang::scheduler...``) under the server."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(server_pid).children(recursive=True):
            try:
                if "scheduler" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.5)
    raise RuntimeError(f"no sglang::scheduler process under server pid {server_pid} after {timeout:.0f} s")


def record(pid: int, stacks: Path, rate: int) -> subprocess.Popen:
    """py-spy sampling process ``pid``'s running threads into ``stacks`` until it gets SIGINT."""
    spy = subprocess.Popen([str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--threads",
                            "--nonblocking", "--format", "raw", "--rate", str(rate), "--output", str(stacks)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(2.0)  # attached before the first request
    return spy


def stop(spy: subprocess.Popen, stacks: Path) -> None:
    spy.send_signal(signal.SIGINT)
    _, err = spy.communicate(timeout=120)
    if not stacks.is_file():
        raise RuntimeError(f"py-spy wrote no {stacks}: {err.decode()[-1000:]}")


def profile_server(name: str, model: str, calibration: str, trace_path: Path, args: argparse.Namespace
                   ) -> dict[str, tuple[Path, float]]:
    """``{workload: (its stacks file, its wall seconds)}`` on a fresh ``name`` server, cache flushed before each."""
    trace = json.loads(trace_path.read_text())
    standard = tuple(w for w in args.workloads if w != "shared_prompt")
    cfg = SessionBenchConfig(max_total_tokens=args.max_total_tokens, workloads=standard or ("own",), out=args.out)
    workloads = standard_workloads(cfg, model, trace_path, trace, None) if standard else []
    if "shared_prompt" in args.workloads:
        workloads.append(shared_prompt_workload(WorkloadConfig(users=args.users, max_tokens=args.output_tokens)))
    bc = BenchConfig(max_total_tokens=args.max_total_tokens, store_fraction=args.store_fraction, out=args.out)
    spec = server_spec("kvtc" if name == "kvtc" else "vanilla", model, calibration, bc)
    out = {}
    with SGLangServer(spec, args.out / "logs" / f"server_{name}.log") as srv:
        if srv.proc is None:
            raise RuntimeError(f"the {name} server has no process after start-up")
        pid = scheduler_pid(srv.proc.pid)
        for wl in workloads:
            flush(srv)
            stacks = args.out / f"{wl.name}_{name}.stacks.txt"
            spy = record(pid, stacks, args.rate)
            t0 = time.perf_counter()
            wl.run(srv, name, args.out / "logs")
            out[wl.name] = (stacks, time.perf_counter() - t0)
            stop(spy, stacks)
            print(f"[{name}] {wl.name}: {out[wl.name][1]:.1f} s wall, stacks in {stacks}", flush=True)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trace", type=Path, required=True, help="trace.json of a main-job run (out/serve/trace.json)")
    p.add_argument("--calibration", type=Path, required=True)
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--max-total-tokens", type=int, default=3072)
    p.add_argument("--store-fraction", type=float, default=0.25)
    p.add_argument("--users", type=int, default=8, help="users of the shared-system-prompt workload")
    p.add_argument("--output-tokens", type=int, default=8)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--servers", nargs="+", choices=("vanilla", "kvtc"), default=["vanilla", "kvtc"])
    p.add_argument("--workloads", nargs="+", choices=("own", "serving", "shared_prompt"),
                   default=["own", "shared_prompt"],
                   help="own: the trace through this project's client; serving: SGLang's benchmark on the trace "
                        "(a trace of benchmarks/agentic_bench.py); shared_prompt: the main job's second workload")
    p.add_argument("--out", type=Path, default=Path("out/profile"))
    args = p.parse_args()
    hf, _ = prepare_default_model(args.artifacts, calibrate=False)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {name: profile_server(name, str(hf), str(args.calibration), args.trace, args) for name in args.servers}
    parts = []
    for workload in runs[args.servers[0]]:
        per_server = {n: profile_counts(parse_raw(runs[n][workload][0].read_text().splitlines())) for n in runs}
        walls = ", ".join(f"{n} {runs[n][workload][1]:.1f} s" for n in runs)
        parts.append(f"### {workload} (wall: {walls})\n\n{profile_table(per_server, args.rate)}\n")
    (args.out / "profile.md").write_text("\n".join(parts))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
