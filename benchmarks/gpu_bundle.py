"""Make, and check, the folder the GPU check carries to a lent GPU machine (``benchmarks/gpu_check.py``).

The machine's image lacks the model, the calibration and nvCOMP (``benchmarks/gpu_image.py``), so the bundle
holds them, and with the working tree it must stay under the 64 MiB the device takes::

    kv.safetensors          real K/V of 1024 held-out prose tokens (what the tests' ``kv_bank`` holds), bf16
    config.json             the model's architecture (gpu_kernels.py times the same prefill, random weights)
    *.kvtc.safetensors      one calibration artifact (r64: about 17 MiB; the r16 one is about 66 MiB)
    wheels/*.whl            Python 3.12 manylinux x86-64 wheels of what the image lacks (nvCOMP)
    manifest.json           every file's size and SHA-256, the wheels' modules, how it was made

From a fresh checkout and the CPU install (``scripts/install.sh``), about 4 minutes (the model, a small
calibration when no r64 artifact exists, one wheel download)::

    python benchmarks/gpu_bundle.py --out gpu_bundle        # [--artifact A] [--wheel-dir D] [--wheels SPEC ...]

``gpu_bundle`` is ignored by git: name it in the device tool's ``carry``. ``validate`` (run by
``gpu_check.py --dry-run``) needs nothing but the standard library.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIB = 1 << 20
TRANSFER_MIB = 64  # the working tree plus carried paths, all the device takes
MIN_TOKENS = 1024
REQUIRED = ("manifest.json", "kv.safetensors", "config.json")
# One wheel with libnvcomp inside (23 MB; 6.x splits it into two wheels of 34 MB), nvcomp.Codec(cuda_stream=...).
DEFAULT_WHEELS = ("nvidia-nvcomp-cu13==5.0.0.6",)
WHEEL_PLATFORM = ["--python-version", gpu_image.IMAGE_PYTHON, "--implementation", "cp", "--only-binary=:all:",
                  "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                  "--platform", "manylinux2014_x86_64"]  # fmt: skip
ARCH_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "hidden_act",
             "tie_word_embeddings", "model_type", "rope_parameters")  # fmt: skip
DEFAULT_ARTIFACT = ROOT / "artifacts" / "smollm2-135m-instruct.r64.kvtc.safetensors"


def folder_nbytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def tree_nbytes(root: Path = ROOT) -> int:
    """Bytes of the working tree as the device tool sends it: tracked files plus untracked, unignored ones."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                         capture_output=True, check=True).stdout.decode()  # fmt: skip
    return sum((root / f).stat().st_size for f in set(out.split("\0")) if f and (root / f).is_file())


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor shapes and ``__metadata__``), standard library only."""
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if not 0 < n < 100_000_000:
            raise ValueError(f"{path} is not a safetensors file")
        return json.loads(fh.read(n))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def write_manifest(out: Path, info: dict | None = None) -> None:
    files = sorted(f for f in out.rglob("*") if f.is_file() and f.name != "manifest.json")
    manifest = {
        "files": {str(f.relative_to(out)): {"bytes": f.stat().st_size, "sha256": sha256(f)} for f in files},
        "wheels": {w.name: sorted(gpu_image.wheel_modules(w)) for w in sorted(out.glob("wheels/*.whl"))},
        "image_python": gpu_image.IMAGE_PYTHON,
        **(info or {}),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def write_bundle(artifact: Path, k, v, config: dict | None, out: Path) -> int:  # noqa: ANN001 (torch tensors)
    """Write ``artifact``, ``k``/``v`` ``[L, T, H, D]``, ``config`` and the manifest into ``out``; its bytes."""
    import torch  # noqa: PLC0415
    from safetensors.torch import save_file  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(artifact, out / artifact.name)
    positions = torch.arange(k.shape[1])
    save_file({"k": k.contiguous(), "v": v.contiguous(), "positions": positions}, str(out / "kv.safetensors"))
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, default=str))
    write_manifest(out)
    return folder_nbytes(out)


def slim_wheel(src: Path, dest: Path) -> Path:
    """Copy of ``src`` in ``dest`` without extension modules of other CPython versions, C headers and static
    libraries (RECORD rewritten): nvCOMP's wheel carries one binding per CPython, 3.8 to 3.13."""
    keep = []
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as zin:
        for item in zin.infolist():
            m = gpu_image.EXTENSION.search(item.filename)
            drop = (m and m.group(1) != "312") or "/include/" in item.filename or item.filename.endswith(".a")
            if not drop:
                keep.append(item)
        record = next(i.filename for i in keep if i.filename.endswith(".dist-info/RECORD"))
        names = {i.filename for i in keep}
        lines = [ln for ln in zin.read(record).decode().splitlines() if ln.split(",")[0] in names]
        out = dest / src.name
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as zout:
            for item in keep:
                data = "\n".join(lines).encode() + b"\n" if item.filename == record else zin.read(item)
                zout.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED)
    return out


def fetch_wheels(specs: list[str], dest: Path, wheel_dir: Path | None = None) -> list[Path]:
    """Python 3.12 manylinux wheels of ``specs`` (from ``wheel_dir`` when given, else pip), slimmed into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp)
        if wheel_dir is None:
            cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *WHEEL_PLATFORM, "-d", str(src)]
            subprocess.run([*cmd, *specs], check=True)
        return [slim_wheel(w, dest) for w in sorted((wheel_dir or src).glob("*.whl"))]


def validate(bundle: Path, budget_mib: float = TRANSFER_MIB, required_modules: tuple[str, ...] = (),
             root: Path = ROOT) -> dict:  # fmt: skip
    """What ``bundle`` holds and every reason it would not serve the GPU check (``problems``, empty if none)."""
    problems: list[str] = []
    report: dict = {"bundle": str(bundle), "problems": problems, "wheels": {}, "carried": []}
    if not bundle.is_dir():
        problems.append(f"{bundle} is not a folder: make it with python benchmarks/gpu_bundle.py --out {bundle}")
        return report
    problems += [f"missing {name}: remake the bundle (benchmarks/gpu_bundle.py)" for name in REQUIRED
                 if not (bundle / name).is_file()]  # fmt: skip
    artifacts = sorted(bundle.glob("*.kvtc.safetensors"))
    if len(artifacts) != 1:
        problems.append(f"needs exactly one calibration artifact (*.kvtc.safetensors), found {len(artifacts)}")
    report["tree_bytes"], report["bundle_bytes"] = tree_nbytes(root), folder_nbytes(bundle)
    total = report["tree_bytes"] + report["bundle_bytes"]
    report["total_mib"] = round(total / MIB, 2)
    if total > budget_mib * MIB:
        problems.append(f"working tree ({report['tree_bytes'] / MIB:.1f} MiB) + bundle "
                        f"({report['bundle_bytes'] / MIB:.1f} MiB) = {total / MIB:.1f} MiB, over the "
                        f"{budget_mib:g} MiB the device takes: use the r64 artifact, fewer --wheels")  # fmt: skip
    if (bundle / "manifest.json").is_file():
        listed = json.loads((bundle / "manifest.json").read_text())["files"]
        present = {str(f.relative_to(bundle)) for f in bundle.rglob("*") if f.is_file()} - {"manifest.json"}
        problems += [f"{n} is listed in manifest.json but missing" for n in sorted(set(listed) - present)]
        problems += [f"{n} is not listed in manifest.json" for n in sorted(present - set(listed))]
        problems += [f"{n} does not match manifest.json (size or SHA-256)" for n in sorted(set(listed) & present)
                     if listed[n]["bytes"] != (bundle / n).stat().st_size or listed[n]["sha256"] != sha256(bundle / n)]
    if (bundle / "kv.safetensors").is_file() and artifacts:
        problems += _kv_problems(bundle / "kv.safetensors", artifacts[0])
    for whl in sorted(bundle.glob("wheels/*.whl")):
        report["wheels"][whl.name] = {"bytes": whl.stat().st_size, "modules": sorted(gpu_image.wheel_modules(whl))}
        problems += gpu_image.wheel_problems(whl)
    report["carried"] = sorted({m for w in report["wheels"].values() for m in w["modules"]})
    problems += [f"no wheel in {bundle}/wheels provides {m} (a Python {gpu_image.IMAGE_PYTHON} wheel; "
                 f"benchmarks/gpu_bundle.py fetches {', '.join(DEFAULT_WHEELS)})" for m in required_modules
                 if not any(m == c or m.startswith(c + ".") for c in report["carried"])]  # fmt: skip
    return report


def _kv_problems(kv_path: Path, artifact: Path) -> list[str]:
    try:
        kv, meta = safetensors_header(kv_path), safetensors_header(artifact)
        model = json.loads(meta["__metadata__"]["kvtc"])["model"]
    except (ValueError, KeyError, OSError) as e:
        return [f"cannot read {kv_path.name} or {artifact.name}: {e}"]
    if "k" not in kv or "v" not in kv:
        return [f"{kv_path.name} needs tensors k and v [L, T, H, D]"]
    num_l, num_t, heads, dim = kv["k"]["shape"]
    problems = []
    if num_t < MIN_TOKENS:
        problems.append(f"{kv_path.name} holds {num_t} tokens, the GPU tests need {MIN_TOKENS}")
    if (num_l, heads, dim) != (model["num_layers"], model["num_kv_heads"], model["head_dim"]):
        problems.append(f"{kv_path.name} is [L={num_l}, H={heads}, D={dim}], {artifact.name} calibrates "
                        f"[{model['num_layers']}, {model['num_kv_heads']}, {model['head_dim']}]")  # fmt: skip
    return problems


def check_budget(nbytes: int, budget_mib: float) -> None:
    """``ValueError`` naming both sizes when ``nbytes`` is over budget."""
    if nbytes > budget_mib * MIB:
        raise ValueError(f"bundle is {nbytes / MIB:.1f} MiB, over the {budget_mib:g} MiB budget (the device "
                         "takes 64 MiB with the repository): use a higher-ratio artifact (r64) or fewer --wheels")


def quick_artifact(lm, out: Path) -> Path:  # noqa: ANN001 (a LoadedModel)
    """A small r64 calibration (6k tokens, as tests/conftest.py makes its r16 one): about 3 minutes here."""
    from kvtc_sglang.calibration.fit import CalibrationConfig, collect, write_artifacts  # noqa: PLC0415

    cfg = CalibrationConfig(tokens=6144, seq_len=1024, holdout_every=3, ratios=(64.0,))
    (path,) = write_artifacts(lm, cfg, collect(lm, cfg, show_progress=False), out, show_progress=False)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, help=f"default: {DEFAULT_ARTIFACT.relative_to(ROOT)}, else calibrate")
    p.add_argument("--out", type=Path, default=ROOT / "gpu_bundle")
    p.add_argument("--wheels", nargs="*", default=list(DEFAULT_WHEELS), help="NAME==VERSION the image lacks")
    p.add_argument("--wheel-dir", type=Path, help="take the wheels from here instead of pip download")
    p.add_argument("--budget-mib", type=float, default=TRANSFER_MIB)
    args = p.parse_args()
    import torch  # noqa: PLC0415

    from kvtc_sglang.calibration.corpus import token_sequences  # noqa: PLC0415
    from kvtc_sglang.calibration.model import load_default_model, prefill_kv  # noqa: PLC0415

    lm = load_default_model(torch.bfloat16, compute_dtype=torch.float32)
    shutil.rmtree(args.out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or (DEFAULT_ARTIFACT if DEFAULT_ARTIFACT.is_file() else None)
        if artifact is None:
            print("no r64 artifact: calibrating a small one (about 3 minutes)", file=sys.stderr)
            artifact = quick_artifact(lm, Path(tmp))
        seqs, _ = token_sequences(lm.tokenizer, "evaluation", "prose", MIN_TOKENS, MIN_TOKENS)
        k, v, _ = prefill_kv(lm.model, seqs[0], torch.bfloat16)  # [L, T, H, D]
        config = {key: val for key, val in lm.model.config.to_dict().items() if key in ARCH_KEYS}
        config.setdefault("rope_theta", (config.get("rope_parameters") or {}).get("rope_theta"))  # transformers 4
        write_bundle(artifact, k, v, config, args.out)
    wheels = fetch_wheels(args.wheels, args.out / "wheels", args.wheel_dir) if args.wheels or args.wheel_dir else []
    write_manifest(args.out, {"artifact": artifact.name, "tokens": MIN_TOKENS, "wheel_specs": args.wheels})
    report = validate(args.out, args.budget_mib)
    print(f"wrote {args.out}: {report['bundle_bytes'] / MIB:.1f} MiB (+ tree {report['tree_bytes'] / MIB:.1f} MiB "
          f"= {report['total_mib']} MiB of {args.budget_mib:g}); wheels: {', '.join(w.name for w in wheels) or '-'}")
    if report["problems"]:
        sys.exit("\n".join(["bundle problems:", *report["problems"]]))


if __name__ == "__main__":
    main()
