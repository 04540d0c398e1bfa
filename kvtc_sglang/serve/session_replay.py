"""The project's own replay of an agentic trace (:mod:`.sessions`) through the official ``openai`` client.

It replays a trace as ``sglang.benchmark.serving`` does (``order="session"``): ``concurrency`` sessions in
flight, each session's turns one after another, the server's own answer appended to the history before the
next turn. ``order="turn"`` replays it turn-major instead: every session's turn ``t`` (``concurrency``
requests in flight, session order) before any session's turn ``t + 1``, so every session pauses while the
others run, as agents waiting on tools do; with ``concurrency=1`` no two requests ever share a batch, and
the TTFT of each request is its own prefill (and restore), not the luck of batching.

Every request is streamed with ``temperature=0``, ``max_tokens=output_tokens`` and ``ignore_eos`` (every
answer is exactly ``output_tokens`` long, as in SGLang's replay, so the contexts of all servers grow by the
same number of tokens), and records its TTFT, latency and the prompt and cached token counts of the
server's ``usage`` (cached tokens need the server's ``--enable-cache-report``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

Message = dict[str, str]
ORDERS = ("session", "turn")


@dataclass(frozen=True)
class ReplayConfig:
    concurrency: int = 4
    output_tokens: int = 32
    timeout: float = 600.0
    ignore_eos: bool = True
    order: str = "session"

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        for name in ("concurrency", "output_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout <= 0:
            raise ValueError(f"timeout must be > 0 s, got {self.timeout}")


@dataclass
class TurnResult:
    """One request of a replay: session and turn index, what the server reported, what the client measured."""

    session: int
    turn: int
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    start: float = 0.0
    text: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


def stream_chat(client: Any, model: str, messages: list[Message], cfg: ReplayConfig, result: TurnResult) -> None:
    """One streamed chat completion into ``result`` (an API error is recorded in ``result.error``)."""
    import openai

    t0 = time.perf_counter()
    result.start = time.time()
    extra = {"ignore_eos": True} if cfg.ignore_eos else None
    try:
        stream = client.chat.completions.create(
            model=model, messages=messages, max_tokens=cfg.output_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, timeout=cfg.timeout, extra_body=extra)
        parts = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if not parts:
                    result.ttft = time.perf_counter() - t0
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.output_tokens = chunk.usage.completion_tokens
                details = chunk.usage.prompt_tokens_details
                result.cached_tokens = (details.cached_tokens or 0) if details is not None else 0
        result.text = "".join(parts)
    except openai.OpenAIError as e:  # recorded per request and counted in the report
        result.error = f"{type(e).__name__}: {e}"
    result.latency = time.perf_counter() - t0
    if not result.ttft:
        result.ttft = result.latency


def _turns(conversation: list[dict]) -> list[list[Message]]:
    """The new messages of each turn of one conversation (turns without messages skipped)."""
    return [[{"role": m["role"], "content": m["content"]} for m in tn["messages"]]
            for tn in conversation if tn.get("messages")]


def _session(client: Any, model: str, s: int, conversation: list[dict], *, cfg: ReplayConfig,
             progress: Callable[[], None]) -> list[TurnResult]:
    history: list[Message] = []
    out = []
    for t, messages in enumerate(_turns(conversation)):
        history += messages
        r = TurnResult(s, t)
        stream_chat(client, model, list(history), cfg, r)
        out.append(r)
        history.append({"role": "assistant", "content": r.text})
        progress()
    return out


def replay(base_url: str, trace: dict[str, Any], cfg: ReplayConfig, model: str = "default",
           progress: Callable[[], None] | None = None) -> list[TurnResult]:
    """Replay every conversation of ``trace`` against ``base_url`` (``http://host:port``); results in trace order."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=cfg.timeout)
    tick = progress or (lambda: None)
    if cfg.order == "turn":
        return _turn_major(client, model, trace["conversations"], cfg, tick)
    with ThreadPoolExecutor(cfg.concurrency) as pool:
        futures = [pool.submit(_session, client, model, s, conv, cfg=cfg, progress=tick)
                   for s, conv in enumerate(trace["conversations"])]
        return [r for fut in futures for r in fut.result()]


def _turn_major(client: Any, model: str, conversations: list[list[dict]], cfg: ReplayConfig,
                tick: Callable[[], None]) -> list[TurnResult]:
    """Every session's turn ``t`` queued before any session's turn ``t + 1``; ``cfg.concurrency`` requests in
    flight; a turn waits for its session's previous turn (queued earlier, so already running or done: no
    deadlock). Results in trace order (session, then turn)."""
    turns = [_turns(c) for c in conversations]
    order = [(t, s) for t in range(max(map(len, turns), default=0)) for s in range(len(turns)) if t < len(turns[s])]
    histories: list[list[Message]] = [[] for _ in turns]
    done = [[threading.Event() for _ in ts] for ts in turns]
    results = [[TurnResult(s, t) for t in range(len(ts))] for s, ts in enumerate(turns)]
    queue = iter(order)
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                job = next(queue, None)
            if job is None:
                return
            t, s = job
            try:
                if t and not done[s][t - 1].wait(cfg.timeout * 2):
                    results[s][t].error = "previous turn did not finish"
                    continue
                histories[s] += turns[s][t]
                stream_chat(client, model, list(histories[s]), cfg, results[s][t])
                histories[s].append({"role": "assistant", "content": results[s][t].text})
                tick()
            finally:
                done[s][t].set()

    with ThreadPoolExecutor(cfg.concurrency) as pool:
        for fut in [pool.submit(worker) for _ in range(cfg.concurrency)]:
            fut.result()
    return [r for rs in results for r in rs]
