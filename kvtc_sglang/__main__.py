"""Main job: calibrate the default model (if no artifact exists yet), print the evaluation report, then
run the serving check (real K/V through SGLang's pool and KVTCRadixCache) with the 16x calibration.

``python -m kvtc_sglang [--ratios 4 8 16 20 32 64] [--artifacts artifacts]``
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .calibration.__main__ import main as calibrate_main
from .calibration.fit import artifact_name
from .calibration.model import DEFAULT_MODEL
from .eval.__main__ import main as eval_main


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m kvtc_sglang", description=__doc__)
    p.add_argument("--ratios", type=float, nargs="+", default=[4, 8, 16, 20, 32, 64])
    p.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    p.add_argument("--segments", type=int, default=3)
    p.add_argument("--json", type=Path, default=Path("out/eval.json"))
    args = p.parse_args()
    ratios = [str(r) for r in args.ratios]
    missing = [r for r in args.ratios if not (args.artifacts / artifact_name(DEFAULT_MODEL, r)).is_file()]
    if missing:
        print(f"calibrating {DEFAULT_MODEL} for ratios {missing} -> {args.artifacts}/")
        calibrate_main(["--ratios", *[str(r) for r in missing], "--out", str(args.artifacts)])
    eval_main(
        [
            "--artifacts",
            str(args.artifacts),
            "--ratios",
            *ratios,
            "--segments",
            str(args.segments),
            "--json",
            str(args.json),
        ]
    )

    if 16 in args.ratios:
        _serving_check(args.artifacts / artifact_name(DEFAULT_MODEL, 16))


def _serving_check(path: Path) -> None:
    from .cache.config import KVTCCacheConfig
    from .calibration.model import load_default_model
    from .codec import KVTCCodec, load_artifact
    from .eval.serving import ServingEvalConfig, format_table, serving_eval

    lm = load_default_model()
    codec = KVTCCodec(load_artifact(path, expect=lm.spec))
    cfg = KVTCCacheConfig(calibration=str(path))
    rows = [serving_eval(lm, codec, cfg, ServingEvalConfig(), sc) for sc in ("multi_turn", "shared_prompt")]
    print(f"\n## Serving check: {path.name} through SGLang's pool and KVTCRadixCache\n")
    print(format_table(rows))


if __name__ == "__main__":
    main()
