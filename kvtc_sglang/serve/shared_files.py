"""Agents in different sessions reading the SAME real files after DIFFERENT histories: the workload of joint
encoding across requests (:mod:`benchmarks.joint_bench`).

Every session opens with a session-specific system prompt (so no two sessions share a radix branch), then one
user message: a task line, a history (one real tool output of a seeded length in ``history_tokens``, from other
evaluation-split documents), then ``Tool output of read_file(PATH):\\n<file text>``, where the block (header and
text) is the SAME string for every session that reads that file (file ``session % files``, its excerpt drawn once
per file). Its tokens are so identical across sessions while its offset (the tokens before it) differs, as the
histories' lengths differ. Each later turn is a short follow-up question.

The JSON is :mod:`.sessions`'s agentic-trace format (its ``turn_counts``, ``pool_for_everything`` and
``session_replay.replay`` read it unchanged); per session the metadata also records its file, its history's
tokens and the file block's estimated token offset in the prompt.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .sessions import (
    GENERATION_PROMPT,
    MESSAGE_OVERHEAD,
    SYSTEM_PROMPT,
    TOOLS,
    Tokens,
    _long_docs,
    _window,
    estimate_turns,
)

ROLE_HEAD = 3  # "<|im_start|>user\n": the tokens of a message before its content
REPOS = ("billing-service", "data-pipeline", "web-frontend", "cli-tools", "ml-platform", "auth-gateway")
USERS = ("ana", "bo", "chen", "dara", "eli", "fatima", "goran", "hana")
TASKS = (
    "find where to add input validation",
    "find the cause of a failing test",
    "add type hints",
    "document the public functions",
    "find dead code",
    "speed up the slowest function",
)
QUESTIONS = (
    "Which function of {path} would you change first, and why?",
    "Does {path} handle empty input?",
    "Name one edge case {path} misses.",
    "What would you test first in {path}?",
)


@dataclass(frozen=True)
class SharedFilesConfig:
    """Sizes of the shared-files sessions. Token counts are of the model's tokenizer.

    Attributes:
        sessions: number of sessions; session ``s`` reads file ``s % files``.
        files: distinct shared files (each read by ``sessions / files`` sessions).
        file_tokens: tokens of each shared file's excerpt.
        history_tokens: (min, max) tokens of each session's history before the read, drawn per session.
        turns: requests per session: the read, then ``turns - 1`` short follow-up questions.
        output_tokens: tokens generated per turn (the replays ignore EOS).
        concurrency: sessions in flight at once (recorded in the trace).
        max_context: a session's estimated final context must not exceed this.
    """

    seed: int = 0
    sessions: int = 8
    files: int = 2
    file_tokens: int = 1200
    history_tokens: tuple[int, int] = (150, 600)
    turns: int = 2
    output_tokens: int = 8
    concurrency: int = 1
    max_context: int = 8192

    def __post_init__(self) -> None:
        for name in ("sessions", "files", "file_tokens", "turns", "output_tokens", "concurrency", "max_context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.files > self.sessions:
            raise ValueError(f"files must be <= sessions ({self.sessions}) so every file is read, got {self.files}")
        lo, hi = self.history_tokens
        if not 1 <= lo <= hi:
            raise ValueError(f"history_tokens must be (min, max) with 1 <= min <= max, got ({lo}, {hi})")
        worst = self.worst_case_context()
        if worst > self.max_context:
            raise ValueError(
                f"sessions may reach {worst} tokens of context (history {hi} + file {self.file_tokens} + "
                f"{self.turns - 1} questions + answers of {self.output_tokens}), more than max_context "
                f"{self.max_context}"
            )

    def worst_case_context(self) -> int:
        """Upper bound of a session's final context: largest sizes, template overhead, the last answer."""
        head = len(SYSTEM_PROMPT) // 2 + 30 + MESSAGE_OVERHEAD  # system prompt and session header line
        first = MESSAGE_OVERHEAD + 80 + self.history_tokens[1] + self.file_tokens  # task, tool lines, both texts
        questions = (self.turns - 1) * (MESSAGE_OVERHEAD + 30)
        answers = self.turns * (self.output_tokens + MESSAGE_OVERHEAD)
        return head + first + questions + answers + GENERATION_PROMPT


def file_block(path: str, text: str) -> str:
    """The shared span: the same string wherever a session reads the file (it ends its message)."""
    return f"Tool output of read_file({path!r}):\n{text}"


def make_shared_trace(cfg: SharedFilesConfig, tokenizer_dir: str | Path) -> dict[str, Any]:
    """The agentic-trace JSON object for ``cfg`` (deterministic for a seed and a corpus)."""
    tokens = Tokens(tokenizer_dir)
    rng = random.Random(cfg.seed)
    candidates = _long_docs(tokens, "code", cfg.file_tokens)
    if len(candidates) < cfg.files:
        raise ValueError(
            f"expected {cfg.files} evaluation code documents of >= {cfg.file_tokens} tokens, found {len(candidates)}"
        )
    shared = []
    for doc, n_doc in rng.sample(candidates, cfg.files):
        path = doc.name.split(":", 1)[-1]
        text = _window(rng, tokens, doc, n_doc, cfg.file_tokens)
        shared.append({"name": doc.name, "path": path, "block": file_block(path, text), "tokens": tokens.count(text)})
    taken = {f["name"] for f in shared}
    history_docs = [
        pair for kind in TOOLS for pair in _long_docs(tokens, kind, cfg.history_tokens[1]) if pair[0].name not in taken
    ]
    answer = "x " * cfg.output_tokens  # stands in for an answer of output_tokens tokens in the estimates
    offsets: dict[int, set[int]] = {f: set() for f in range(cfg.files)}
    conversations, sessions_meta = [], []
    for s in range(cfg.sessions):
        f = s % cfg.files
        path, block = shared[f]["path"], shared[f]["block"]
        system = {
            "role": "system",
            "content": f"{SYSTEM_PROMPT}\nSession {s}, repository "
            f"{REPOS[s % len(REPOS)]}, user {USERS[s % len(USERS)]}.",
        }
        head = tokens.count(system["content"]) + MESSAGE_OVERHEAD + ROLE_HEAD
        for _ in range(100):  # a history whose length puts the file at an offset no other reader of it has
            hdoc, n_hdoc = history_docs[rng.randrange(len(history_docs))]
            command = rng.choice(TOOLS[hdoc.kind]).format(name=hdoc.name.split(":", 1)[-1])
            history = _window(rng, tokens, hdoc, n_hdoc, rng.randint(*cfg.history_tokens))
            prefix = f"Task {s}: {rng.choice(TASKS)} in {path}.\nTool output of `{command}`:\n{history.rstrip()}\n"
            offset = head + tokens.count(prefix)
            if offset not in offsets[f]:
                break
        offsets[f].add(offset)
        turns: list[dict[str, Any]] = [{"messages": [system, {"role": "user", "content": prefix + block}]}]
        for t in range(1, cfg.turns):
            question = rng.choice(QUESTIONS).format(path=path)
            turns.append({"messages": [{"role": "user", "content": f"Question {t}: {question}"}]})
        estimates = estimate_turns(tokens, turns, answer)
        conversations.append(turns)
        sessions_meta.append(
            {
                "file": shared[f]["name"],
                "file_index": f,
                "history": hdoc.name,
                "history_tokens": tokens.count(history),
                "file_offset_tokens": offset,
                "estimated_prompt_tokens": estimates,
                "estimated_final_context": estimates[-1] + cfg.output_tokens,
            }
        )
    files_meta = [
        {
            "name": x["name"],
            "path": x["path"],
            "file_tokens": x["tokens"],
            "block_tokens": tokens.count(x["block"]),
            "sessions": list(range(f, cfg.sessions, cfg.files)),
        }
        for f, x in enumerate(shared)
    ]
    shared_total = sum(files_meta[m["file_index"]]["block_tokens"] for m in sessions_meta)
    meta = {
        "generator": "kvtc_sglang.serve.shared_files",
        "config": asdict(cfg),
        "tokenizer": str(tokenizer_dir),
        "corpus": "kvtc_sglang.calibration.corpus, evaluation split (code: CPython stdlib, prose: pydoc_data)",
        "files": files_meta,
        "sessions": sessions_meta,
        "estimated_prompt_tokens_total": sum(sum(m["estimated_prompt_tokens"]) for m in sessions_meta),
        "estimated_context_total": sum(m["estimated_final_context"] for m in sessions_meta),
        "shared_block_tokens_total": shared_total,
        "shared_block_tokens_repeated": shared_total - sum(x["block_tokens"] for x in files_meta),
    }
    return {"metadata": meta, "conversations": conversations}
