"""Helpers of the real-server tests (``tests/test_server_*.py``): model export, server runs, log checks."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from kvtc_sglang.serve.bench import parse_metrics
from kvtc_sglang.serve.launcher import ServerSpec
from kvtc_sglang.serve.server import SGLangServer
from kvtc_sglang.serve.workload import WorkloadConfig, _excerpts, chat, run_agentic, run_shared_prompt

REPO = Path(__file__).resolve().parents[1]
HF_ROOT = REPO / "artifacts" / "hf"
CONTROL_FLAGS = ["--enable-cache-report", "--disable-overlap-schedule"]
# kvtc with compression effectively off: nothing is ever idle long enough, a small store
CONTROL_KVTC_FLAGS = ["--kvtc-idle-seconds", "1000000", "--kvtc-store-fraction", "0.1"]
START_TIMEOUT = 400.0
# Lines that mean the scheduler failed; SGLang's start-up "Ignore import error when loading <model>" lines
# (optional model files on CPU) are not failures.
_BAD = re.compile(r"Traceback|memory leak|double free|use-after-free|Scheduler hit an exception|RuntimeError")


def hf_model(name: str = "smollm2-135m-instruct") -> str:
    """The HF export of one of ``calibration.model.MODELS`` under ``artifacts/hf`` (made once)."""
    from kvtc_sglang.serve.export import export_model

    return str(export_model(name, HF_ROOT / name))


def control_run(backend: str, model: str, calibration: str, log_dir: Path, wl: WorkloadConfig, *,
                pool: int = 16384, flags: tuple[str, ...] = (), env: dict | None = None,
                kvtc_flags: tuple[str, ...] = tuple(CONTROL_KVTC_FLAGS)) -> tuple[list, str]:  # fmt: skip
    """The exact control's run on one backend: the agentic and shared-prompt workloads of ``wl`` one request
    at a time; returns every result (in order) and the server log. ``flags``/``env``: more server flags and
    environment (tensor parallelism); ``kvtc_flags``: what turns compression off for kvtc."""
    extra = CONTROL_FLAGS + (list(kvtc_flags) if backend == "kvtc" else []) + list(flags)
    spec = ServerSpec(backend, model, calibration, max_total_tokens=pool, extra=extra)
    srv = start(spec, log_dir / f"{backend}.log", env=env)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        runs = [
            run_agentic(client, "default", wl, lambda: None),
            run_shared_prompt(client, "default", wl, lambda: None),
        ]
    finally:
        srv.stop()
    return [r for run in runs for r in run.results], srv.log_text()


def assert_identical(vanilla: list, kvtc: list) -> None:
    """Same requests, same generations, same prompt and cached-token counts, and some reuse."""
    assert [r.key for r in vanilla] == [r.key for r in kvtc]
    for v, k in zip(vanilla, kvtc, strict=True):
        assert not v.error and not k.error, (v.error, k.error)
        assert v.text and v.text == k.text, (v.key, v.text, k.text)
        assert (v.prompt_tokens, v.cached_tokens) == (k.prompt_tokens, k.cached_tokens), v.key
    assert sum(r.cached_tokens for r in kvtc) > 0  # the workload does reuse prefixes


def start(spec: ServerSpec, log: Path, env: dict | None = None) -> SGLangServer:
    env = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1", **(env or {})}  # SGLang's idle leak check raises
    return SGLangServer(spec, log, start_timeout=START_TIMEOUT, env=env).start()


def scheduler_errors(log_text: str) -> list[str]:
    return [line for line in log_text.splitlines() if _BAD.search(line)]


def kvtc_metrics(server: SGLangServer) -> dict[str, float]:
    return parse_metrics(server.get("/metrics")[1])


def chat_turn(client, convs, tools, turn, pool, *, wl: WorkloadConfig,
              question: str = "What does this code do?") -> list:  # fmt: skip
    """One turn of every conversation at once: ``tools[c][turn]`` and ``question`` appended to conversation ``c``,
    the requests sent concurrently through ``pool``, the answers appended; returns the results."""
    for c, msgs in enumerate(convs):
        msgs.append({"role": "user", "content": f"Tool output:\n{tools[c][turn]}\n\n{question}"})
    futs = [pool.submit(chat, client, "default", f"c{c}/t{turn}", list(m), wl) for c, m in enumerate(convs)]
    results = [f.result() for f in futs]
    for msgs, r in zip(convs, results, strict=True):
        msgs.append({"role": "assistant", "content": r.text or "(no answer)"})
    return results


def _aborted_stream(client) -> int:
    """Start a long streamed answer and drop the connection after a few chunks; returns chunks read."""
    stream = client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Write a long story about a compiler."}],
        max_tokens=200,
        temperature=0,
        stream=True,
        timeout=120,
    )
    n = 0
    for _chunk in stream:
        n += 1
        if n >= 5:
            break
    stream.close()
    return n


def pressure_run(model: str, calibration: str, *, page: int, overlap: bool, log_dir: Path, wl: WorkloadConfig,
                 pool: int, flags: tuple[str, ...] = (), env: dict | None = None) -> dict:  # fmt: skip
    """kvtc on a pool too small for ``wl``'s concurrent conversations: two turns, an aborted stream,
    ``/flush_cache``, the remaining turns, ``/health``, then ``/metrics`` once idle. Returns the results per
    turn, the status codes, the metrics and the log. ``flags``/``env``: more server flags and environment."""
    extra = ["--enable-cache-report", "--enable-metrics", "--page-size", str(page), *flags]
    if not overlap:
        extra.append("--disable-overlap-schedule")
    spec = ServerSpec("kvtc", model, calibration, max_total_tokens=pool, extra=extra)
    srv = start(spec, log_dir / "server.log", env=env)
    out = {"page": page}
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        flat = _excerpts(wl.seed, wl.conversations * wl.turns, wl.tool_chars, "code")
        tools = [flat[c * wl.turns : (c + 1) * wl.turns] for c in range(wl.conversations)]
        convs = [[{"role": "system", "content": f"You are agent #{c}."}] for c in range(wl.conversations)]
        with ThreadPoolExecutor(wl.conversations) as workers:
            before = [chat_turn(client, convs, tools, t, workers, wl=wl) for t in range(2)]
            out["aborted_chunks"] = _aborted_stream(client)
            # The aborted stream may still be in the scheduler: SGLang refuses (400) a flush while any request
            # runs or waits, and its ?timeout= waits for the scheduler to go idle first.
            out["flush"] = srv.post("/flush_cache?timeout=120", timeout=180.0)[0]
            after = [chat_turn(client, convs, tools, t, workers, wl=wl) for t in range(2, wl.turns)]
        out["results"] = before + after
        out["health_after_abort"] = srv.get("/health")[0]
        time.sleep(3.0)  # idle: SGLang's strict memory check runs; the reporter logs the final counters
        out["metrics"] = kvtc_metrics(srv)
    finally:
        srv.stop()
    out["log"] = srv.log_text()
    return out
