"""Where a SGLang scheduler process spends its CPU time, from py-spy's sampled stacks.

``py-spy record --format raw --threads`` (without ``--idle``: only samples of threads that are running) writes
one line per distinct stack: ``thread (TID): NAME;frame;frame;... COUNT``, root first, each frame
``function (file:line)``, the file shortened by py-spy (``kvtc_sglang/cache/radix.py``, but SGLang's as bare names such
as ``scheduler.py``). :func:`parse_raw` reads those lines; :func:`categorize` puts each sample in one
category, by the first rule of :data:`RULES` that any frame of its stack matches (kvtc's codec before the rest of
kvtc, kvtc before SGLang's forward, which it may run inside of, and so on); :func:`profile_table` sums them per
thread group (the scheduler thread, kvtc's encode worker, other threads).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

_LINE = re.compile(r"^thread \((\d+)\)(?::\s*([^;]*?))?(?:;(.*))?\s(\d+)$")

# (category, pattern a frame's "function (file:line)" text must contain); first match wins
RULES: tuple[tuple[str, str], ...] = (
    ("kvtc codec (encode, restore, CRC)", "kvtc_sglang/codec/"),
    ("kvtc tree, store and bookkeeping", "kvtc_sglang/"),
    ("forward (run_batch)", "run_batch ("),
    ("radix cache and allocator (SGLang)", "radix_cache.py:"),  # py-spy shortens SGLang's paths to file names
    ("radix cache and allocator (SGLang)", "allocator"),
    ("batch results (SGLang)", "process_batch_result"),
    ("scheduling (SGLang)", "get_next_batch_to_run ("),
    ("request intake (SGLang)", "recv_requests ("),
    ("request intake (SGLang)", "process_input_requests ("),
)
OTHER = "other"


@dataclass(frozen=True)
class Stack:
    thread: str  # the thread's name (py-spy prints it for Python threads), else its id
    frames: tuple[str, ...]  # root first
    count: int


def parse_raw(lines: Iterable[str]) -> list[Stack]:
    """Stacks of py-spy's ``--format raw --threads`` output; raises ValueError on a line it cannot read."""
    out = []
    for n, raw in enumerate(lines, 1):
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"line {n}: expected 'thread (TID): NAME;frames COUNT', got {line[:120]!r}")
        tid, name, frames, count = m.groups()
        out.append(Stack((name or "").strip() or tid, tuple(frames.split(";")) if frames else (), int(count)))
    return out


def categorize(stack: Stack) -> str:
    """The first rule of :data:`RULES` any frame matches, else :data:`OTHER`."""
    for category, pattern in RULES:
        if any(pattern in frame for frame in stack.frames):
            return category
    return OTHER


def thread_group(name: str) -> str:
    """``scheduler`` (SGLang's main thread), ``kvtc encode worker`` or ``other threads``."""
    if name == "MainThread":
        return "scheduler"
    if name.startswith("kvtc-encode"):
        return "kvtc encode worker"
    return "other threads"


def profile_counts(stacks: Iterable[Stack]) -> dict[str, Counter[str]]:
    """``{thread group: Counter(category -> samples)}``."""
    out: dict[str, Counter[str]] = {}
    for s in stacks:
        out.setdefault(thread_group(s.thread), Counter())[categorize(s)] += s.count
    return out


def profile_table(per_server: dict[str, dict[str, Counter[str]]], rate: float) -> str:
    """A markdown table: CPU seconds (samples / ``rate``) per thread group and category, one column per server."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, got {rate}")
    servers = list(per_server)
    rows: list[tuple[str, str]] = []
    for group in ("scheduler", "kvtc encode worker", "other threads"):
        cats = sorted({c for counts in per_server.values() for c in counts.get(group, {})},
                      key=lambda c: [r[0] for r in RULES].index(c) if c != OTHER else len(RULES))
        rows += [(group, c) for c in cats]
    lines = ["| thread | where (CPU s, sampled) | " + " | ".join(servers) + " |",
             "|---|---|" + "---|" * len(servers)]
    for group, cat in rows:
        cells = [f"{per_server[s].get(group, Counter())[cat] / rate:.1f}" for s in servers]
        lines.append(f"| {group} | {cat} | " + " | ".join(cells) + " |")
    totals = [f"{sum(sum(c.values()) for c in per_server[s].values()) / rate:.1f}" for s in servers]
    lines.append("| all | **total CPU s sampled** | " + " | ".join(totals) + " |")
    return "\n".join(lines)
