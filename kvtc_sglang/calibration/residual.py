"""Residual calibration for joint encoding: the bit allocation of a span's residual against a reference copy of the
same text, fitted on real text read after different histories.

For each calibration-split file, two sessions read it after two different prose prefixes (different lengths: the
copies sit at different offsets). The reference calibration's codec codes one copy as a reference blob; the other
copy's coefficients minus what the reference decodes to are the residuals ``[N, 2, R]`` whose group errors the DP
allocates under the budget ``2 * 16 * F / ratio`` bits per token (K and V together). The result is a
:class:`~kvtc_sglang.codec.residual_artifact.ResidualCalibration` naming the reference calibration.

    python -m kvtc_sglang.calibration.residual --reference artifacts/smollm2-135m-instruct.r8.kvtc.safetensors \
        --out artifacts/smollm2-135m-instruct.r8.residual.safetensors

Tensor parallelism: ``--tp-size N`` fits one residual calibration per rank against that rank's reference
calibration (``m.r8.tp2-rank1.kvtc.safetensors``, beside the whole model's) on that rank's KV heads, and writes
``m.r8.residual.tp2-rank1.safetensors`` beside ``--out``; the server, given ``--out``'s path, loads its rank's.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..codec import KVTCCodec, load_artifact
from ..codec.artifact import CalibrationArtifact
from ..codec.residual_artifact import ResidualCalibration
from ..codec.tp import rank_artifact_path, split_heads
from .bitalloc import allocate_bits_joint, measure_group_errors
from .corpus import documents
from .fit import KINDS, fp8_scales
from .model import DEFAULT_MODEL, MODELS, LoadedModel, kv_dtype, load_model, prefill_kv


@dataclass(frozen=True)
class ResidualFitConfig:
    """``files`` calibration files per kind, ``file_tokens`` each, read after prefixes of ``prefixes`` tokens (the
    first reads the reference copy); residual budget ``2 * 16 * F / ratio`` bits per token."""

    files: int = 3
    kinds: tuple[str, ...] = ("code", "prose")
    file_tokens: int = 1024
    prefixes: tuple[int, int] = (200, 450)
    ratio: float = 256.0

    def __post_init__(self) -> None:
        if self.files < 1 or self.file_tokens < 16:
            raise ValueError(f"need files >= 1 and file_tokens >= 16, got {self.files} and {self.file_tokens}")
        if len(self.prefixes) != 2 or min(self.prefixes) < 1 or self.prefixes[0] == self.prefixes[1]:
            raise ValueError(f"prefixes must be two different lengths >= 1, got {self.prefixes}")
        if self.ratio <= 1:
            raise ValueError(f"ratio must be > 1, got {self.ratio}")


def _token_docs(lm: LoadedModel, kind: str, count: int, min_tokens: int, skip: int = 0) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    tokenizer: Any = lm.tokenizer
    for doc in documents("calibration", kind):
        ids = tokenizer(doc.text)["input_ids"]
        if len(ids) < min_tokens:
            continue
        if skip:
            skip -= 1
            continue
        out.append(torch.tensor(ids[:min_tokens], dtype=torch.long))
        if len(out) == count:
            return out
    raise RuntimeError(f"calibration split has {len(out)} {kind} documents of >= {min_tokens} tokens, need {count}")


def _copy_coefficients(lm: LoadedModel, codec: KVTCCodec, prefix: torch.Tensor, file: torch.Tensor) -> tuple:
    """The file's coefficients ``([n, R_k], [n, R_v])`` as read after ``prefix``, in ``codec``'s space (a rank's
    calibration: on that rank's KV heads)."""
    k, v, _ = prefill_kv(lm.model, torch.cat([prefix, file]), kv_dtype(lm.spec))  # [L, P + n, H, D]
    heads = codec.spec.tp_heads
    if codec.spec.tp_size > 1:
        k, v = split_heads(k, heads), split_heads(v, heads)  # [L, P + n, H_r, D]
    lo = prefix.numel()
    return codec.transform(k[:, lo:], v[:, lo:], torch.arange(lo, lo + file.numel()))


def residuals(lm: LoadedModel, reference: CalibrationArtifact, cfg: ResidualFitConfig) -> torch.Tensor:
    """Calibration residuals ``[N, 2, R]`` (``R = max(R_k, R_v)``, zero-padded): each file's second copy minus what
    its first copy's reference blob decodes to."""
    codec = KVTCCodec(reference)
    prefix_doc = _token_docs(lm, "prose", 1, max(cfg.prefixes), skip=cfg.files)[0]
    out = []
    for kind in cfg.kinds:
        for file in _token_docs(lm, kind, cfg.files, cfg.file_tokens):
            ref = _copy_coefficients(lm, codec, prefix_doc[: cfg.prefixes[0]], file)
            ref = codec.dequantize(codec.quantize(*ref), file.numel())  # what the reference blob decodes to
            cur = _copy_coefficients(lm, codec, prefix_doc[-cfg.prefixes[1]:], file)
            r = max(ref[0].shape[1], ref[1].shape[1])
            d = [torch.nn.functional.pad(c - c_ref, (0, r - c.shape[1])) for c, c_ref in zip(cur, ref, strict=True)]
            out.append(torch.stack(d, dim=1))  # [n, 2, R]
    return torch.cat(out)


def fit_residual(lm: LoadedModel, reference: CalibrationArtifact, cfg: ResidualFitConfig, reference_file: str
                 ) -> ResidualCalibration:
    """The residual calibration of ``reference`` (see the module docstring), whose file is ``reference_file`` (a
    name: the server looks for it beside the residual calibration)."""
    t0 = time.perf_counter()
    d = residuals(lm, reference, cfg)  # [N, 2, R]
    ranks = (reference.keys.allocation.rank, reference.values.allocation.rank)
    scales = [fp8_scales(d[:, i]) for i in (0, 1)]  # [R] each (zero columns past a stream's rank cost nothing)
    errors = tuple(measure_group_errors(d[:, i].contiguous(), scales[i], KINDS) for i in (0, 1))
    budget = int(2 * 16 * reference.spec.num_features / cfg.ratio) // 2 * 2
    ak, av = allocate_bits_joint((errors[0], errors[1]), d.shape[2], budget)
    scales = [scales[0][: ranks[0]], scales[1][: ranks[1]]]  # [R_k], [R_v]
    energy = float(d.pow(2).sum())
    info = {**asdict(cfg), "reference_file": reference_file, "tokens": int(d.shape[0]), "residual_energy": energy,
            "budget_bits": budget,
            "seconds": round(time.perf_counter() - t0, 1), "corpus": "calibration split"}
    return ResidualCalibration(reference.spec.name, reference.artifact_id.hex(), ak, av, (scales[0], scales[1]), info)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m kvtc_sglang.calibration.residual", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL)
    p.add_argument("--reference", type=Path, required=True, help="the reference calibration (e.g. an r8 artifact)")
    p.add_argument("--out", type=Path, required=True, help="the residual calibration to write")
    p.add_argument("--ratio", type=float, default=ResidualFitConfig.ratio, help="residual budget: 2*16*F/ratio bits")
    p.add_argument("--files", type=int, default=ResidualFitConfig.files, help="calibration files per kind")
    p.add_argument("--tp-size", type=int, default=1, help="fit each rank's (against --reference's rank artifacts)")
    args = p.parse_args(argv)
    if args.tp_size < 1:
        p.error(f"--tp-size must be >= 1, got {args.tp_size}")
    if args.out.parent.resolve() != args.reference.parent.resolve():
        p.error(f"--out must be in the reference's folder {args.reference.parent} (the server finds it there)")
    lm = load_model(args.model, torch.bfloat16, compute_dtype=torch.float32)
    cfg = ResidualFitConfig(files=args.files, ratio=args.ratio)
    paths = write_residuals(lm, cfg, args.reference, args.out, args.tp_size)
    return paths[0]


def write_residuals(lm: LoadedModel, cfg: ResidualFitConfig, reference: Path, out: Path, tp_size: int = 1
                    ) -> list[Path]:
    """Fit and save the residual calibration of ``reference`` at ``out`` (``tp_size`` > 1: each rank's, against
    the reference's rank artifacts, at the rank paths of ``out``); returns the paths written."""
    paths = []
    for rank in range(tp_size):
        ref_path = rank_artifact_path(reference, tp_size, rank)
        ref = load_artifact(ref_path, expect=None if tp_size > 1 else lm.spec)
        if ref.spec.tp_size != tp_size or (tp_size > 1 and ref.spec.tp_rank != rank):
            raise ValueError(f"{ref_path.name} is rank {ref.spec.tp_rank} of {ref.spec.tp_size}, expected rank "
                             f"{rank} of {tp_size}")  # fmt: skip
        cal = fit_residual(lm, ref, cfg, ref_path.name)
        path = cal.save(rank_artifact_path(out, tp_size, rank, ".safetensors"))
        print(f"{path}: {cal.bits_per_token} bits/token against {ref_path.name} ({cal.info['tokens']} tokens, "
              f"{cal.info['seconds']} s)")
        paths.append(path)
    return paths


if __name__ == "__main__":
    main()
