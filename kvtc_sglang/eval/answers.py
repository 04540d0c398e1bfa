"""Long-context answer tasks on real text (RULER-style) and their scorer: what users see of a compressed cache.

A document is real prose or code of the evaluation split (``calibration.corpus``), cut to a token budget, with
facts placed at seeded depths:

* ``needle``: one "The secret code of <city> is <7 digits>." sentence; asked for the number;
* ``multi-key``: four "The access PIN of <name> is <7 digits>." sentences; asked for one name's number;
* ``variable-tracking``: ``VAR A = <5 digits>.``, ``VAR B = VAR A.``, ``VAR C = VAR B.`` at three depths; asked
  for C's value;
* ``span``: lines of the document itself (up to three), quoted by their first six words; asked for the next four
  words.

Answers are scored as RULER does (the normalized answer appears in the normalized prediction: ``exact``) and by
token F1. No model and no SGLang here: the benchmark (``benchmarks/answer_bench.py``) sends the prompts.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from ..calibration.corpus import documents

TASKS = ("needle", "multi-key", "variable-tracking", "span")
CITIES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tallinn", "Hobart", "Dakar", "Bergen", "Cusco", "Perth", "Lyon",
          "Tromso", "Accra", "Sapporo", "Valletta", "Windhoek")
NAMES = ("Amara Okafor", "Bruno Lindqvist", "Chen Wei", "Dalia Haddad", "Emil Novak", "Farah Qureshi",
         "Goran Petrov", "Hana Sato", "Ines Moreau", "Jonas Berg", "Kiri Walker", "Lucia Romero")
VARS = ("QX", "ZR", "MV", "TK", "PL", "HW", "BN", "GD", "YF", "CU", "KS", "WE")
INTRO = "Read the following document carefully. You will be asked questions about it.\n\n"
SYSTEM_INTRO = "You answer questions about the following document.\n\n"
LAYOUTS = ("turns", "system")  # the document as a first user turn, or as a tenant's long system prompt
READ_REPLY = "I have read the document."
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class Question:
    task: str
    prompt: str
    answer: str


@dataclass(frozen=True)
class AnswerDocument:
    """One document with its placed facts; ``text`` is what the first turn sends (after :data:`INTRO`)."""

    name: str
    kind: str
    text: str
    questions: tuple[Question, ...]

    def messages(self, question: Question | None = None, layout: str = "turns") -> list[dict[str, str]]:
        """The chat that reads the document (``question`` None) or asks ``question`` about it.

        ``layout="turns"``: the document is a first user turn, answered, then each question is a later turn;
        ``"system"``: the document is a long system prompt (a tenant's) and each question one user's first turn
        (a read is the system prompt with an empty question)."""
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        if layout == "system":
            return [{"role": "system", "content": SYSTEM_INTRO + self.text},
                    {"role": "user", "content": "Hello." if question is None else question.prompt}]
        first = [{"role": "user", "content": INTRO + self.text}]
        if question is None:
            return first
        return [*first, {"role": "assistant", "content": READ_REPLY}, {"role": "user", "content": question.prompt}]


def normalize(text: str) -> list[str]:
    """Lower-case alphanumeric words of ``text``."""
    return _WORD.findall(text.lower())


def exact_match(prediction: str, answer: str) -> bool:
    """RULER's string match: the normalized answer appears, as whole words, in the normalized prediction."""
    want = " ".join(normalize(answer))
    return bool(want) and f" {want} " in f" {' '.join(normalize(prediction))} "


def f1(prediction: str, answer: str) -> float:
    """Token F1 of the normalized prediction against the normalized answer (SQuAD's)."""
    pred, gold = normalize(prediction), normalize(answer)
    common = sum(min(pred.count(w), gold.count(w)) for w in set(gold))
    if not pred or not gold or common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def _haystack(kind: str, skip: int, tokens: int, count_tokens: Callable[[str], int]) -> tuple[str, str]:
    """Real text of ``kind`` (evaluation split, from the ``skip``-th document on) cut to about ``tokens`` tokens,
    at a line boundary: ``(name, text)``."""
    docs = documents("evaluation", kind)[skip:]
    lines: list[str] = []
    names = []
    for doc in docs:
        names.append(doc.name)
        lines.extend(doc.text.splitlines())
        if count_tokens("\n".join(lines)) >= tokens:
            break
    else:
        raise RuntimeError(f"the evaluation split's {kind} documents after {skip} hold fewer than {tokens} tokens")
    lo, hi = 0, len(lines)
    while lo < hi:  # the most lines that fit the budget
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count_tokens("\n".join(lines[:mid])) <= tokens else (lo, mid - 1)
    return "+".join(names), "\n".join(lines[:lo])


def _span_questions(lines: list[str], rng: random.Random, count: int) -> list[Question]:
    """Up to ``count`` lines quoted by their first six words (which occur once in the document), asked for the next
    four; at least one."""
    text = "\n".join(lines)
    picks = []
    for line in lines[len(lines) // 10 : -len(lines) // 10 or None]:
        words = line.split()
        if len(words) >= 10 and '"' not in line and text.count(" ".join(words[:6])) == 1:
            picks.append(words)
    if not picks:
        raise RuntimeError("no quotable line (>= 10 words, a unique opening, no double quote) in the middle 80%")
    out = []
    for words in rng.sample(picks, min(count, len(picks))):
        quote = " ".join(words[:6])
        prompt = f'In the document, which words come right after "{quote}"? Answer with the next four words only.'
        out.append(Question("span", prompt, " ".join(words[6:10])))
    return out


def build_document(kind: str, skip: int, *, tokens: int, count_tokens: Callable[[str], int], seed: int,
                   spans: int = 3) -> AnswerDocument:
    """A document of about ``tokens`` tokens of real ``kind`` text with the facts of every task placed in it."""
    rng = random.Random(f"{kind}:{skip}:{seed}")
    name, text = _haystack(kind, skip, tokens - 300, count_tokens)  # room for the facts
    lines = text.splitlines()
    questions = _span_questions(lines, rng, spans)
    facts: list[tuple[float, str]] = []
    city, code = rng.choice(CITIES), f"{rng.randrange(10**6, 10**7)}"
    facts.append((rng.uniform(0.1, 0.9), f"The secret code of {city} is {code}."))
    questions.append(Question("needle", f"What is the secret code of {city}? Answer with the number only.", code))
    people = rng.sample(NAMES, 4)
    pins = [f"{rng.randrange(10**6, 10**7)}" for _ in people]
    facts += [(rng.uniform(0.1, 0.9), f"The access PIN of {p} is {n}.") for p, n in zip(people, pins, strict=True)]
    asked = rng.randrange(4)
    questions.append(Question("multi-key", f"What is the access PIN of {people[asked]}? Answer with the number only.",
                              pins[asked]))
    a, b, c = rng.sample(VARS, 3)
    value = f"{rng.randrange(10**4, 10**5)}"
    depths = sorted(rng.uniform(0.05, 0.95) for _ in range(3))
    facts += [(depths[0], f"VAR {a} = {value}."), (depths[1], f"VAR {b} = VAR {a}."),
              (depths[2], f"VAR {c} = VAR {b}.")]
    ask = f"What value does VAR {c} hold? Answer with the number only."
    questions.append(Question("variable-tracking", ask, value))
    for depth, sentence in sorted(facts, reverse=True):  # from the end, so earlier depths keep their line index
        lines.insert(round(depth * len(lines)), sentence)
    return AnswerDocument(name, kind, "\n".join(lines), tuple(questions))
