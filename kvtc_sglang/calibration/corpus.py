"""Real text available offline: prose and code, split into disjoint calibration and evaluation sets.

* prose: the Python reference manual's topic pages (``pydoc_data.topics``, shipped with CPython);
* code: the Python standard library's own ``.py`` sources;
* c: C and C++ headers under ``/usr/include`` (Debian's libc6-dev, linux-libc-dev and whatever else the machine
  has installed there: declarations, macros and their comments; identical copies counted once), an optional
  extra calibration domain (``CalibrationConfig.domains``), drawn in CRC32 order of the path so that a sample
  spans many packages;
* perl: Perl modules (``.pm``: Perl code and POD documentation) shipped by Debian's ``perl-base`` and
  ``perl-modules-5.*`` packages -- a third domain, neither Python prose nor Python code, used for
  evaluation only (calibration reads prose and code, and C headers when asked).

Documents are assigned to a split by a CRC32 of their name, so the split is stable and disjoint; the
document names of each split are recorded in the artifact.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("calibration", "evaluation")
KINDS = ("prose", "code", "c", "perl")
EVAL_ONLY_KINDS = {"perl": "Perl modules (*.pm) of Debian perl-base and perl-modules-5.x (/usr/share/perl, perl-base)"}
SOURCES = {
    "prose": "pydoc_data.topics (the Python reference manual's topic pages)",
    "code": "CPython stdlib *.py",
    "c": "C and C++ headers under /usr/include (*.h, identical copies once), in CRC32 order of the path",
    "perl": EVAL_ONLY_KINDS["perl"],
}
_C_ROOT = Path("/usr/include")
_PERL_ROOTS = ("/usr/share/perl", "/usr/lib/x86_64-linux-gnu/perl-base", "/usr/lib/aarch64-linux-gnu/perl-base")


@dataclass(frozen=True)
class Document:
    name: str
    kind: str
    text: str


def _split_of(name: str) -> str:
    return "evaluation" if zlib.crc32(name.encode()) % 4 == 0 else "calibration"


def _prose() -> list[Document]:
    from pydoc_data import topics  # noqa: PLC0415

    return [Document(f"pydoc_data.topics:{k}", "prose", topics.topics[k]) for k in sorted(topics.topics)]


def _code(max_bytes: int = 60_000) -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if 2_000 <= len(text) <= max_bytes:
            docs.append(Document(f"stdlib:{path.name}", "code", text))
    return docs


def _c(max_bytes: int = 60_000) -> list[Document]:
    docs, seen = [], set()
    for path in sorted(_C_ROOT.rglob("*.h")) if _C_ROOT.is_dir() else []:
        if path.is_file() and 2_000 <= path.stat().st_size <= max_bytes:
            text = path.read_text(encoding="utf-8", errors="replace")
            if (digest := zlib.crc32(text.encode())) not in seen:  # one copy of headers vendored per arch
                seen.add(digest)
                docs.append(Document(f"include:{path.relative_to(_C_ROOT).as_posix()}", "c", text))
    if not docs:
        raise RuntimeError(f"no C headers found under {_C_ROOT}: apt-get install libc6-dev")
    return sorted(docs, key=lambda d: zlib.crc32(d.name.encode()))  # spread over packages, not alphabetical


def _perl(max_bytes: int = 60_000) -> list[Document]:
    docs = []
    for root in map(Path, _PERL_ROOTS):
        for path in sorted(root.rglob("*.pm")) if root.is_dir() else []:
            size = path.stat().st_size
            if 2_000 <= size <= max_bytes:
                rel = path.relative_to(root).as_posix()
                docs.append(Document(f"perl:{rel}", "perl", path.read_text(encoding="utf-8", errors="replace")))
    if not docs:
        raise RuntimeError(f"no Perl modules found under {_PERL_ROOTS}: apt-get install perl-modules-5.36 (or newer)")
    unique = {d.name: d for d in docs}  # the same module under two roots counts once
    return [unique[n] for n in sorted(unique)]


def documents(split: str, kind: str) -> list[Document]:
    """All documents of ``kind`` (prose, code, c or perl) in ``split`` (calibration or evaluation)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    docs = {"prose": _prose, "code": _code, "c": _c, "perl": _perl}[kind]()
    return [d for d in docs if _split_of(d.name) == split]


def token_sequences(tokenizer: Any, split: str, kind: str, seq_len: int, max_tokens: int) -> tuple[list, list[str]]:
    """Concatenate a split's documents and cut ``[seq_len]`` token id sequences, up to ``max_tokens``.

    Returns ``(sequences, document names used)``; each sequence is a 1-D ``torch.long`` tensor.
    """
    import torch  # noqa: PLC0415

    seqs: list = []
    names: list[str] = []
    buf: list[int] = []
    for doc in documents(split, kind):
        if len(seqs) * seq_len >= max_tokens:
            break
        names.append(doc.name)
        buf.extend(tokenizer(doc.text + "\n\n")["input_ids"])
        while len(buf) >= seq_len and len(seqs) * seq_len < max_tokens:
            seqs.append(torch.tensor(buf[:seq_len], dtype=torch.long))
            buf = buf[seq_len:]
    return seqs, names
