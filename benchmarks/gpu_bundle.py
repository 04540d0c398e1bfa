"""Write a small folder with one real artifact, real K/V and the model's config, for GPU checks on a machine
without the model (the config lets ``benchmarks/gpu_kernels.py`` time the same architecture's prefill).

``python benchmarks/gpu_bundle.py --artifact artifacts/smollm2-135m-instruct.r64.kvtc.safetensors --out gpu_bundle``
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from kvtc_sglang.calibration.corpus import token_sequences
from kvtc_sglang.calibration.model import load_default_model, prefill_kv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--out", type=Path, default=Path("gpu_bundle"))
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.artifact, args.out / args.artifact.name)
    lm = load_default_model()
    seqs, _ = token_sequences(lm.tokenizer, "evaluation", "prose", args.tokens, args.tokens)
    k, v, _ = prefill_kv(lm.model, seqs[0])  # [L, T, H, D] bf16
    save_file(
        {"k": k.contiguous(), "v": v.contiguous(), "positions": torch.arange(args.tokens)},
        str(args.out / "kv.safetensors"),
    )
    (args.out / "config.json").write_text(json.dumps(lm.model.config.to_dict(), default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
