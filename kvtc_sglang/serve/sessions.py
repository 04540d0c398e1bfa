"""Long-context coding-agent sessions from real text, as the trace ``sglang.benchmark.serving`` replays.

Each session opens with a long "file read" (a real CPython standard-library source, a token window of
``first_read_tokens``), then ``turns - 1`` tool outputs of ``tool_tokens`` each (excerpts of other
stdlib sources and pages of the Python reference manual: "grep", "cat", "pydoc" results). The replay
appends the server's own answer after every turn, so a session's context grows turn by turn (2-6k tokens
with the defaults: the regime of SmolLM2's 8k window where a prefix cache saves most prefill). All text comes from
:func:`kvtc_sglang.calibration.corpus.documents` (the evaluation split), never random tokens; the
choice of documents and windows is seeded and deterministic.

The JSON is what ``python -m sglang.benchmark.serving --backend sglang-oai-chat --dataset-name
agentic-trace --dataset-path FILE`` reads (``sglang/benchmark/datasets/agentic_trace.py``)::

    {"metadata": {...},
     "conversations": [[{"messages": [system, user], "prompt_tokens": N}, {"messages": [user], ...}, ...], ...]}

Each turn's ``messages`` holds only the new (non-assistant) messages of that turn; ``prompt_tokens`` is
this module's estimate of the turn's prompt (chat template included, every earlier answer counted as
``output_tokens`` tokens): informational, the server reports the real count.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..calibration.corpus import Document, documents

Message = dict[str, str]
SYSTEM_PROMPT = ("You are a coding agent working in a Python repository. You read files and tool outputs, "
                 "then say in one or two sentences what you would do next.")
MESSAGE_OVERHEAD = 5  # "<|im_start|>role\n" ... "<|im_end|>\n" in SmolLM2's chat template
GENERATION_PROMPT = 3  # "<|im_start|>assistant\n"
TOOLS = {"code": ("grep -n -A40 'def ' {name}", "cat {name}", "python -m pytest -x {name}", "git show HEAD -- {name}"),
         "prose": ("python -c 'help(\"{name}\")'", "pydoc {name}")}


@dataclass(frozen=True)
class TraceConfig:
    """Sizes of the sessions. Token counts are of SmolLM2's tokenizer (``tokenizer`` directory).

    Attributes:
        sessions: number of sessions (conversations).
        turns: requests per session, the first read included (>= 1).
        first_read_tokens: (min, max) tokens of the opening file read, drawn uniformly per session.
        tool_tokens: (min, max) tokens of each later tool output, drawn uniformly per turn.
        output_tokens: tokens generated per turn (``max_tokens``; the replays ignore EOS).
        concurrency: sessions in flight at once (recorded in the trace; the replays use it).
        max_context: a session's estimated final context (prompt + answer) must not exceed this.
    """

    seed: int = 0
    sessions: int = 8
    turns: int = 4
    first_read_tokens: tuple[int, int] = (2000, 4000)
    tool_tokens: tuple[int, int] = (200, 400)
    output_tokens: int = 32
    concurrency: int = 4
    max_context: int = 8192

    def __post_init__(self) -> None:
        for name in ("sessions", "turns", "output_tokens", "concurrency", "max_context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("first_read_tokens", "tool_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be (min, max) with 1 <= min <= max, got ({lo}, {hi})")
        worst = self.worst_case_context()
        if worst > self.max_context:
            raise ValueError(f"sessions may reach {worst} tokens of context (first read {self.first_read_tokens[1]}"
                             f" + {self.turns - 1} tool outputs of {self.tool_tokens[1]} + answers of "
                             f"{self.output_tokens}), more than max_context {self.max_context}")

    def worst_case_context(self) -> int:
        """Upper bound of a session's final context: largest sizes, template overhead, the last answer."""
        head = len(SYSTEM_PROMPT) // 2 + MESSAGE_OVERHEAD  # a generous bound of the system prompt's tokens
        turn = MESSAGE_OVERHEAD + 40  # the tool line and the question around each excerpt
        answers = self.turns * (self.output_tokens + MESSAGE_OVERHEAD)
        return (head + self.first_read_tokens[1] + turn + (self.turns - 1) * (self.tool_tokens[1] + turn)
                + answers + GENERATION_PROMPT)


class Tokens:
    """Token counting and token-bounded excerpts with the model's own tokenizer (``tokenizer.json``)."""

    def __init__(self, tokenizer_dir: str | Path) -> None:
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise ValueError(f"expected a tokenizer.json in {tokenizer_dir}, found none")
        self.tok = Tokenizer.from_file(str(path))

    def count(self, text: str) -> int:
        return len(self.tok.encode(text, add_special_tokens=False).ids)

    def excerpt(self, text: str, start: int, n_tokens: int) -> str:
        """About ``n_tokens`` tokens of ``text`` from the line at char ``start``, cut at a line end."""
        start = text.rfind("\n", 0, start) + 1
        window = text[start:start + n_tokens * 8]
        offsets = self.tok.encode(window, add_special_tokens=False).offsets
        if len(offsets) <= n_tokens:
            return window
        cut = offsets[n_tokens - 1][1]
        line_end = window.rfind("\n", 0, cut)
        return window[:line_end + 1] if line_end > cut * 0.8 else window[:cut]


@lru_cache(maxsize=4)
def _docs(kind: str) -> tuple[Document, ...]:
    return tuple(documents("evaluation", kind))


def _long_docs(tokens: Tokens, kind: str, min_tokens: int) -> list[tuple[Document, int]]:
    out = [(d, n) for d in _docs(kind) if (n := tokens.count(d.text)) >= min_tokens]
    if not out:
        raise RuntimeError(f"no evaluation {kind} document of >= {min_tokens} tokens in the corpus")
    return out


def _window(rng: random.Random, tokens: Tokens, doc: Document, doc_tokens: int, n: int) -> str:
    """A window of ``n`` tokens at a seeded place inside ``doc`` (``doc_tokens`` long)."""
    room = max(doc_tokens - n, 0) / max(doc_tokens, 1)
    return tokens.excerpt(doc.text, int(rng.random() * room * len(doc.text)), n)


def _prompt_tokens(tokens: Tokens, history: list[Message]) -> int:
    return sum(tokens.count(m["content"]) + MESSAGE_OVERHEAD for m in history) + GENERATION_PROMPT


def estimate_turns(tokens: Tokens, turns: list[dict[str, Any]], answer: str) -> list[int]:
    """Each turn's ``prompt_tokens`` estimate (set on the turn, and returned): its messages after every earlier
    turn, each earlier turn followed by ``answer``."""
    estimates, replay = [], []
    for t, turn in enumerate(turns):
        if t:
            replay.append({"role": "assistant", "content": answer})
        replay += turn["messages"]
        turn["prompt_tokens"] = _prompt_tokens(tokens, replay)
        estimates.append(turn["prompt_tokens"])
    return estimates


def make_trace(cfg: TraceConfig, tokenizer_dir: str | Path) -> dict[str, Any]:
    """The agentic-trace JSON object for ``cfg`` (deterministic for a seed and a corpus)."""
    tokens = Tokens(tokenizer_dir)
    rng = random.Random(cfg.seed)
    reads = _long_docs(tokens, "code", cfg.first_read_tokens[1])
    rng.shuffle(reads)
    tool_docs = [pair for kind in TOOLS for pair in _long_docs(tokens, kind, cfg.tool_tokens[1])]
    answer = "x " * cfg.output_tokens  # stands in for an answer of output_tokens tokens in the estimates
    conversations, sessions_meta = [], []
    for s in range(cfg.sessions):
        doc, n_doc = reads[s % len(reads)]
        n_read = rng.randint(*cfg.first_read_tokens)
        path = doc.name.split(":", 1)[-1]
        history: list[Message] = [{"role": "system", "content": SYSTEM_PROMPT}]
        first = {"role": "user", "content": f"Task {s}: review {path} and find where to add input validation.\n"
                 f"Tool output of read_file({path!r}):\n{_window(rng, tokens, doc, n_doc, n_read)}"}
        turns = [{"messages": [history[0], first]}]
        history.append(first)
        tools_meta = []
        for t in range(1, cfg.turns):
            tdoc, n_tdoc = tool_docs[rng.randrange(len(tool_docs))]
            name = tdoc.name.split(":", 1)[-1]
            command = rng.choice(TOOLS[tdoc.kind]).format(name=name)
            text = _window(rng, tokens, tdoc, n_tdoc, rng.randint(*cfg.tool_tokens))
            msg = {"role": "user", "content": f"Tool output of `{command}` (step {t}):\n{text}\nWhat next?"}
            turns.append({"messages": [msg]})
            history += [{"role": "assistant", "content": answer}, msg]
            tools_meta.append(tdoc.name)
        estimates = estimate_turns(tokens, turns, answer)
        conversations.append(turns)
        sessions_meta.append({"first_read": doc.name, "first_read_tokens": tokens.count(first["content"]),
                              "tools": tools_meta, "estimated_prompt_tokens": estimates,
                              "estimated_final_context": estimates[-1] + cfg.output_tokens})
    meta = {"generator": "kvtc_sglang.serve.sessions", "config": asdict(cfg), "tokenizer": str(tokenizer_dir),
            "corpus": "kvtc_sglang.calibration.corpus, evaluation split (code: CPython stdlib, prose: pydoc_data)",
            "sessions": sessions_meta,
            "estimated_prompt_tokens_total": sum(sum(m["estimated_prompt_tokens"]) for m in sessions_meta),
            "estimated_context_total": sum(m["estimated_final_context"] for m in sessions_meta)}
    return {"metadata": meta, "conversations": conversations}


def write_trace(cfg: TraceConfig, tokenizer_dir: str | Path, path: Path) -> dict[str, Any]:
    trace = make_trace(cfg, tokenizer_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trace, indent=1) + "\n")
    return trace


def load_trace(path: Path) -> dict[str, Any]:
    trace = json.loads(Path(path).read_text())
    convs = trace.get("conversations") if isinstance(trace, dict) else None
    if not convs or not all(isinstance(c, list) and c for c in convs):
        raise ValueError(f"{path}: expected an agentic trace with non-empty 'conversations', got {type(trace)}")
    return trace


def turn_counts(trace: dict[str, Any]) -> list[int]:
    """Requests per conversation, in trace order (how SGLang's replay flattens its outputs)."""
    return [sum(1 for turn in conv if turn.get("messages")) for conv in trace["conversations"]]


def pool_for_everything(trace: dict[str, Any], page_size: int = 1, slack: float = 1.25) -> int:
    """A ``--max-total-tokens`` that holds every session's final context at once (with ``slack``)."""
    total = trace["metadata"]["estimated_context_total"]
    step = max(1024, page_size)
    return int(-(-total * slack // step) * step)


def add_trace_arguments(group: Any, defaults: TraceConfig, concurrency_help: str = "requests in flight") -> None:
    """The trace's options of a benchmark script (``--seed``, ``--sessions``, ``--turns``, ``--first-read-tokens``,
    ``--tool-tokens``, ``--output-tokens``, ``--concurrency``) on an argparse parser or group, ``defaults``'s
    values as defaults."""
    d = defaults
    group.add_argument("--seed", type=int, default=d.seed)
    group.add_argument("--sessions", type=int, default=d.sessions)
    group.add_argument("--turns", type=int, default=d.turns, help="requests per session, the first read included")
    for name, value in (("--first-read-tokens", d.first_read_tokens), ("--tool-tokens", d.tool_tokens)):
        group.add_argument(name, type=int, nargs=2, default=value, metavar=("MIN", "MAX"))
    group.add_argument("--output-tokens", type=int, default=d.output_tokens)
    group.add_argument("--concurrency", type=int, default=d.concurrency, help=concurrency_help)


def trace_config(args: argparse.Namespace, **override: Any) -> TraceConfig:
    """The :class:`TraceConfig` of parsed :func:`add_trace_arguments` options (``override`` wins)."""
    fields = {"seed": args.seed, "sessions": args.sessions, "turns": args.turns,
              "first_read_tokens": tuple(args.first_read_tokens), "tool_tokens": tuple(args.tool_tokens),
              "output_tokens": args.output_tokens, "concurrency": args.concurrency}  # fmt: skip
    return TraceConfig(**{**fields, **override})
