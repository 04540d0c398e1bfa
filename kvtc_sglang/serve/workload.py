"""Seeded chat workloads replayed against a running server through the official ``openai`` client.

* ``agentic``: several conversations, each turn appends a tool output (a real document excerpt) and a
  question; the turns of all conversations are interleaved and sent concurrently, so each conversation's
  growing prefix must survive the others' traffic to be reused.
* ``shared_prompt``: many users, a few long system prompts (real documentation text), short questions.

Texts come from :mod:`kvtc_sglang.calibration.corpus` (the evaluation split: the Python reference manual
and the standard library's sources), never random tokens. Every request is streamed (time to first token)
with ``temperature=0`` and a bounded ``max_tokens`` and timeout.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..calibration.corpus import documents

Message = dict[str, str]


@dataclass(frozen=True)
class WorkloadConfig:
    """Sizes of the two workloads (defaults: about 10 minutes for both backends on a 2-core CPU)."""

    seed: int = 0
    conversations: int = 6
    turns: int = 3
    tool_chars: int = 800  # about 200 tokens of tool output per turn
    concurrency: int = 3
    system_prompts: int = 3
    system_chars: int = 1600  # about 400 tokens per system prompt
    users: int = 8
    max_tokens: int = 24
    timeout: float = 120.0

    def __post_init__(self) -> None:
        for name in ("conversations", "turns", "tool_chars", "concurrency", "system_prompts", "system_chars",
                     "users", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RequestResult:
    """One request: ``key`` identifies it across backends (workload, conversation, turn)."""

    key: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    text: str = ""
    error: str = ""


@dataclass
class WorkloadRun:
    name: str
    results: list[RequestResult] = field(default_factory=list)
    seconds: float = 0.0


def _excerpts(seed: int, count: int, chars: int, kind: str) -> list[str]:
    """``count`` excerpts of ``chars`` characters from real documents, chosen with ``seed``."""
    docs = [d for d in documents("evaluation", kind) if len(d.text) > chars * 2]
    if not docs:
        raise RuntimeError(f"no {kind} document longer than {2 * chars} characters in the corpus")
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        d = rng.choice(docs)
        start = rng.randrange(0, len(d.text) - chars)
        out.append(f"[{d.name}]\n{d.text[start:start + chars]}")
    return out


def chat(client: object, model: str, key: str, messages: list[Message], cfg: WorkloadConfig) -> RequestResult:
    """One streamed chat completion; records TTFT, latency, the answer and the cached-token count."""
    import openai

    r = RequestResult(key)
    t0 = time.perf_counter()
    try:
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=cfg.max_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, timeout=cfg.timeout,
        )
        parts = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if not parts:
                    r.ttft = time.perf_counter() - t0
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                r.prompt_tokens = chunk.usage.prompt_tokens
                details = chunk.usage.prompt_tokens_details
                r.cached_tokens = (details.cached_tokens or 0) if details is not None else 0
        r.text = "".join(parts)
    except openai.OpenAIError as e:  # recorded per request and reported (a failed request is counted)
        r.error = f"{type(e).__name__}: {e}"
    r.latency = time.perf_counter() - t0
    if not r.ttft:
        r.ttft = r.latency
    return r


def run_agentic(client: object, model: str, cfg: WorkloadConfig, progress: Callable[[], None]) -> WorkloadRun:
    tools = _excerpts(cfg.seed, cfg.conversations * cfg.turns, cfg.tool_chars, "code")
    convs: list[list[Message]] = [
        [{"role": "system", "content": f"You are coding agent #{c}. Read each tool output and answer briefly."}]
        for c in range(cfg.conversations)
    ]
    run = WorkloadRun("agentic")
    t0 = time.perf_counter()
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        for turn in range(cfg.turns):
            for c, msgs in enumerate(convs):
                tool = tools[c * cfg.turns + turn]
                msgs.append({"role": "user", "content": f"Tool output:\n{tool}\n\nWhat does this code do?"})
            futures = [pool.submit(chat, client, model, f"agentic/c{c}/t{turn}", list(m), cfg)
                       for c, m in enumerate(convs)]
            for c, fut in enumerate(futures):
                res = fut.result()
                run.results.append(res)
                convs[c].append({"role": "assistant", "content": res.text or "(no answer)"})
                progress()
    run.seconds = time.perf_counter() - t0
    return run


def run_shared_prompt(client: object, model: str, cfg: WorkloadConfig, progress: Callable[[], None]) -> WorkloadRun:
    systems = _excerpts(cfg.seed + 1, cfg.system_prompts, cfg.system_chars, "prose")
    rng = random.Random(cfg.seed + 2)
    questions = ["Summarize the key rule.", "Give one example.", "What is the most common mistake?",
                 "Explain it to a beginner.", "Which keyword matters most here?", "What changed in Python 3?"]
    jobs = []
    first_of: dict[int, int] = {}  # system prompt -> its first user
    for u in range(cfg.users):
        s = rng.randrange(cfg.system_prompts)
        msgs = [{"role": "system", "content": f"Answer using this documentation:\n{systems[s]}"},
                {"role": "user", "content": f"User {u}: {rng.choice(questions)}"}]
        jobs.append((f"shared/u{u}/s{s}", msgs))
        first_of.setdefault(s, u)
    run = WorkloadRun("shared_prompt")
    # Each system prompt's first user goes first (those run concurrently, one per prompt), then the rest:
    # which requests share a batch no longer decides how much is cached (two users of a prompt nobody has
    # sent yet would both prefill it), so every backend that keeps the prompts prefills the same tokens.
    first = sorted(first_of.values())
    rest = [u for u in range(len(jobs)) if u not in first]
    results: dict[int, RequestResult] = {}
    t0 = time.perf_counter()
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        for wave in (first, rest):
            futures = {i: pool.submit(chat, client, model, jobs[i][0], jobs[i][1], cfg) for i in wave}
            for i, fut in futures.items():
                results[i] = fut.result()
                progress()
    run.results = [results[i] for i in range(len(jobs))]
    run.seconds = time.perf_counter() - t0
    return run


def request_count(cfg: WorkloadConfig) -> int:
    return cfg.conversations * cfg.turns + cfg.users
