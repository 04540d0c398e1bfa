"""SGLang's own serving benchmark (``python -m sglang.benchmark.serving``) against a running server.

Two workloads, both multi-turn through ``--backend sglang-oai-chat`` (SGLang replays each conversation
round by round and feeds the server's answer back):

* ``agentic-trace`` with a trace from :mod:`.sessions` (``--dataset-path``, ``--num-prompts`` sessions,
  ``--sharegpt-output-len`` tokens per answer);
* ``generated-shared-prefix`` with ``--gsp-num-turns`` (SGLang's generator: groups of conversations sharing
  one system prompt; its prompts are random token ids decoded to text, SGLang's choice, not this project's).

Both run with ``--warmup-requests 0`` (a warm-up would replay a whole conversation and leave its prefix
cached), ``--max-concurrency`` sessions in flight, ``--cache-report`` (cached tokens per request) and
``--output-details`` (per-request TTFTs); SGLang ignores EOS by default, so every answer has the asked
length. The tokenizer is the server's model directory and ``HF_HUB_OFFLINE=1`` is set: nothing is
downloaded. SGLang writes one JSON line per run; :func:`parse_result` maps its flat per-request lists back
to (session, turn).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .session_replay import TurnResult


@dataclass(frozen=True)
class GSPConfig:
    """``generated-shared-prefix`` sizes (SGLang's ``--gsp-*`` flags)."""

    groups: int = 4
    prompts_per_group: int = 2
    system_prompt_tokens: int = 1500
    question_tokens: int = 64
    output_tokens: int = 16
    turns: int = 3
    concurrency: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("groups", "prompts_per_group", "system_prompt_tokens", "question_tokens", "output_tokens",
                     "turns", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def requests(self) -> int:
        return self.groups * self.prompts_per_group * self.turns


def _common(base_url: str, model: str, out_file: Path, concurrency: int, seed: int) -> list[str]:
    return [sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang-oai-chat", "--base-url", base_url,
            "--model", model, "--tokenizer", model, "--max-concurrency", str(concurrency), "--warmup-requests", "0",
            "--output-file", str(out_file), "--output-details", "--cache-report", "--disable-tqdm",
            "--seed", str(seed), "--ready-check-timeout-sec", "60"]


def agentic_command(base_url: str, model: str, trace_path: Path, trace: dict[str, Any], out_file: Path) -> list[str]:
    cfg = trace["metadata"]["config"]
    return _common(base_url, model, out_file, cfg["concurrency"], cfg["seed"]) + [
        "--dataset-name", "agentic-trace", "--dataset-path", str(trace_path),
        "--num-prompts", str(len(trace["conversations"])), "--sharegpt-output-len", str(cfg["output_tokens"])]


def gsp_command(base_url: str, model: str, cfg: GSPConfig, out_file: Path) -> list[str]:
    return _common(base_url, model, out_file, cfg.concurrency, cfg.seed) + [
        "--dataset-name", "generated-shared-prefix", "--gsp-num-groups", str(cfg.groups),
        "--gsp-prompts-per-group", str(cfg.prompts_per_group), "--gsp-system-prompt-len", str(cfg.system_prompt_tokens),
        "--gsp-question-len", str(cfg.question_tokens), "--gsp-output-len", str(cfg.output_tokens),
        "--gsp-num-turns", str(cfg.turns), "--num-prompts", str(cfg.groups * cfg.prompts_per_group)]


def bench_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


@dataclass
class BenchRun:
    """One ``sglang.benchmark.serving`` run: per-request results and SGLang's own summary line."""

    results: list[TurnResult]
    summary: dict[str, Any]
    seconds: float


def run(cmd: list[str], out_file: Path, turns: list[int], log: Path, timeout: float) -> BenchRun:
    """Run ``cmd`` (its output goes to ``log``) and parse ``out_file``; ``turns``: requests per conversation."""
    out_file.unlink(missing_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("wb") as fh:
        try:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=bench_env(), timeout=timeout,
                                  check=False)
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"sglang.benchmark.serving ran past {timeout:.0f} s; its log: {log}") from e
    seconds = time.perf_counter() - t0
    if proc.returncode != 0 or not out_file.is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RuntimeError(f"sglang.benchmark.serving exited with {proc.returncode} (expected 0 and a result in "
                           f"{out_file}):\n{tail}")
    results, summary = parse_result(out_file.read_text(), turns)
    return BenchRun(results, summary, seconds)


def parse_result(text: str, turns: list[int]) -> tuple[list[TurnResult], dict[str, Any]]:
    """The last JSON line SGLang wrote: per-request :class:`TurnResult` (trace order) and its scalar summary."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError("expected one JSON line from sglang.benchmark.serving, got an empty file")
    row = json.loads(lines[-1])
    n = sum(turns)
    ttfts, inputs, outputs = row.get("ttfts", []), row.get("input_lens", []), row.get("output_lens", [])
    if len(ttfts) != n:
        raise ValueError(f"expected {n} requests ({len(turns)} conversations of {turns} turns), SGLang reported "
                         f"{len(ttfts)}")
    cached = row.get("cached_tokens") or [0] * n
    errors = row.get("errors") or [""] * n
    texts = row.get("generated_texts") or [""] * n
    results, i = [], 0
    for s, k in enumerate(turns):
        for t in range(k):
            results.append(TurnResult(s, t, prompt_tokens=int(inputs[i]), cached_tokens=int(cached[i] or 0),
                                      output_tokens=int(outputs[i]), ttft=float(ttfts[i]), text=texts[i] or "",
                                      error=errors[i] or ""))
            i += 1
    summary = {k: v for k, v in row.items() if isinstance(v, int | float | str) or k == "cache_report"}
    return results, summary
