"""Write the folder ``benchmarks/gpu_check.py`` needs on a GPU machine without the model: one real artifact,
real K/V (1024 held-out prose tokens, what the tests' ``kv_bank`` holds) and the model's config (so
``gpu_kernels.py`` times the same architecture's prefill), plus optional wheels of GPU packages the device
image lacks. The device takes at most 64 MiB with the repository, so the bundle must stay under
``--budget-mib`` (56 by default): use the r64 artifact (the r16 one is about 76 MB)::

    python benchmarks/gpu_bundle.py --artifact artifacts/smollm2-135m-instruct.r64.kvtc.safetensors --out gpu_bundle \\
        [--wheels nvidia-nvcomp-cu13==5.0.0.6]

``gpu_bundle`` is ignored by git (``.gitignore``): name it in the device tool's ``carry``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

MIB = 1 << 20
# The device image: Python 3.12, x86-64 manylinux (see the device notes); wheels are fetched for it.
WHEEL_PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:",
                  "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                  "--platform", "manylinux2014_x86_64"]  # fmt: skip


def folder_nbytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def write_bundle(artifact: Path, k: torch.Tensor, v: torch.Tensor, config: dict | None, out: Path) -> int:
    """Write artifact, ``k``/``v`` ``[L, T, H, D]`` and ``config`` into ``out``; returns the folder's bytes."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(artifact, out / artifact.name)
    positions = torch.arange(k.shape[1])
    save_file({"k": k.contiguous(), "v": v.contiguous(), "positions": positions}, str(out / "kv.safetensors"))
    if config is not None:
        (out / "config.json").write_text(json.dumps(config, default=str))
    return folder_nbytes(out)


def check_budget(nbytes: int, budget_mib: float) -> None:
    """``ValueError`` naming both sizes when the bundle is over budget."""
    if nbytes > budget_mib * MIB:
        raise ValueError(
            f"bundle is {nbytes / MIB:.1f} MiB, over the {budget_mib:g} MiB budget (the device takes 64 MiB with "
            f"the repository): use a higher-ratio artifact (r64) or fewer --tokens / --wheels"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=1024, help="K/V tokens (the tests need 1024)")
    p.add_argument("--out", type=Path, default=Path("gpu_bundle"))
    p.add_argument("--wheels", nargs="*", default=[], help="NAME==VERSION of packages the device image lacks")
    p.add_argument("--budget-mib", type=float, default=56.0)
    args = p.parse_args()
    from kvtc_sglang.calibration.corpus import token_sequences  # noqa: PLC0415
    from kvtc_sglang.calibration.model import load_default_model, prefill_kv  # noqa: PLC0415

    lm = load_default_model()
    seqs, _ = token_sequences(lm.tokenizer, "evaluation", "prose", args.tokens, args.tokens)
    k, v, _ = prefill_kv(lm.model, seqs[0])  # [L, T, H, D] bf16
    write_bundle(args.artifact, k, v, lm.model.config.to_dict(), args.out)
    if args.wheels:
        wheels = args.out / "wheels"
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", *WHEEL_PLATFORM, "-d", str(wheels)]
        subprocess.run([*cmd, *args.wheels], check=True)
    nbytes = folder_nbytes(args.out)
    check_budget(nbytes, args.budget_mib)
    print(f"wrote {args.out}: {nbytes / MIB:.1f} MiB")


if __name__ == "__main__":
    main()
