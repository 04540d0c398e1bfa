"""End-to-end serving accuracy of KVTCRadixCache with the default model on CPU.

Real SmolLM2 K/V goes through SGLang's real pool and radix cache; each turn matches (restoring compressed
nodes into pool pages), continues generation from those pages, and is compared with an uncompressed full
prefill. Prints a markdown table and writes JSON::

    python benchmarks/serving_e2e.py --artifact artifacts/smollm2-135m-instruct.r16.kvtc.safetensors [--full]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.calibration.model import load_default_model
from kvtc_sglang.codec import KVTCCodec, load_artifact
from kvtc_sglang.eval.serving import ServingEvalConfig, format_table, serving_eval

DEFAULT = ServingEvalConfig()
FULL = ServingEvalConfig(turns=8, turn_tokens=256, system_tokens=1536, users=16, user_tokens=64, pool_tokens=16384)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", type=Path, required=True)
    ap.add_argument("--full", action="store_true", help="bigger scenarios")
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--json", type=Path, default=Path("out/serving_e2e.json"))
    args = ap.parse_args()
    lm = load_default_model()
    artifact = load_artifact(args.artifact, expect=lm.spec)
    codec = KVTCCodec(artifact)
    sizes = FULL if args.full else DEFAULT
    sizes = ServingEvalConfig(**{**sizes.__dict__, "page_size": args.page_size})
    rows = [serving_eval(lm, codec, KVTCCacheConfig(calibration=str(args.artifact)), sizes, sc)
            for sc in ("multi_turn", "shared_prompt")]
    print(f"calibration {args.artifact.name} (target {artifact.target_ratio:g}x), page size {args.page_size}\n")
    print(format_table(rows))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
