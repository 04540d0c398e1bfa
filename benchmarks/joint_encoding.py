"""Joint encoding of KV across requests (the second source paper): can two sessions' copies of the same text share
bytes, or prefill?

Sessions read the same real file (code, prose) after different histories (prefixes of 300-600 tokens of other
documents); two prefixes of one length put the copies at the same offset, the others at different offsets; a
different file is the control. For each reader/reference pair: the cosine of the two copies in four domains, the
paper's fusion, the reference's KV re-rotated to the reader's positions, and the reader's span coded as the
reference plus a quantized residual (bit allocation fitted on calibration-split residuals), each scored by the KL,
top-1 and NLL of the file's continuation against the exact cache, beside KVTC coding the span alone.

    .venv/bin/python benchmarks/joint_encoding.py --model smollm2-135m-instruct --artifacts out/joint/cal \\
        --json benchmarks/results/joint_encoding_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from joint_report import Tallies, markdown

from kvtc_sglang.calibration.fit import artifact_name
from kvtc_sglang.calibration.model import DEFAULT_MODEL, MODELS, load_model
from kvtc_sglang.codec import KVTCCodec, ZlibDeflate, load_artifact
from kvtc_sglang.eval.joint import FusionRule, fuse_blocks, rerotate
from kvtc_sglang.eval.joint_sessions import Session, open_session, score, token_docs
from kvtc_sglang.eval.residual import (
    ResidualFit,
    apply_residual,
    code_residual,
    features,
    kvtc_payload_bytes,
    residual_coefficients,
    unfeatures,
)

PAIRS = ((0, 1), (1, 0), (2, 0), (3, 1))  # (reader, reference) sessions


@dataclass(frozen=True)
class ProbeConfig:
    prefix_lengths: tuple[int, ...] = (300, 300, 450, 600)
    file_tokens: int = 1200
    continuation: int = 128
    window: int = 128  # the reader's last tokens stay exact in the storage methods, as KVTC keeps them
    files: int = 2  # shared files per kind
    kinds: tuple[str, ...] = ("code", "prose")
    calibration_files: int = 2  # files per kind whose residuals fit the residual's bit allocation
    divisors: tuple[float, ...] = (2, 4, 8, 16)  # residual budget = KVTC's bits per token (first ratio) / divisor
    recompute: int = 16  # reuse: the first tokens after the boundary computed, not taken (CacheBlend's idea)
    rule: FusionRule = FusionRule()

    def __post_init__(self) -> None:
        if len(self.prefix_lengths) != 4 or self.prefix_lengths[0] != self.prefix_lengths[1]:
            raise ValueError(f"need 4 prefix lengths, the first two equal (one offset), got {self.prefix_lengths}")
        if self.file_tokens <= self.window + self.recompute:
            raise ValueError(f"file_tokens {self.file_tokens} must exceed window + recompute")
        if self.files < 2:  # the control pairs a reader with a session that read the next file of its kind
            raise ValueError(f"files must be >= 2 (the control reads another file of the same kind), got {self.files}")


def sessions(lm, cfg: ProbeConfig, split: str, kind: str, count: int) -> list[list[Session]]:
    """``count`` files of ``kind`` from ``split``, each read by four sessions after the four prefixes (prose
    documents of the other split, so that no prefix holds the file)."""
    need = cfg.file_tokens + cfg.continuation + 1
    other = "calibration" if split == "evaluation" else "evaluation"
    prefixes = token_docs(lm, other, "prose", 4, min_tokens=max(cfg.prefix_lengths))
    files = token_docs(lm, split, kind, count, min_tokens=need)
    return [[open_session(lm, p[:n], f, cfg.file_tokens, cfg.continuation)
             for p, n in zip(prefixes, cfg.prefix_lengths, strict=True)] for f in files]


def span(s: Session, end_trim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The session's copy of the file, less its last ``end_trim`` tokens: K, V ``[L, n', H, D]``, positions ``[n']``."""
    lo, hi = s.prefix, s.context - end_trim
    return s.k[:, lo:hi], s.v[:, lo:hi], torch.arange(lo, hi)


def reference(base: KVTCCodec, ref: KVTCCodec | None, s: Session, cfg: ProbeConfig) -> tuple[torch.Tensor, ...]:
    """The reference's features ``([n', F], [n', F])`` of the stored span: exact (``ref`` None), or as its own
    blob of the codec ``ref`` decodes."""
    k, v, pos = span(s, cfg.window)
    if ref is not None:
        k, v, _ = ref.decode(ref.encode(k, v, pos))
    return features(base, k, v, pos)


def fit_residuals(lm, codec: KVTCCodec, refs: dict[str, KVTCCodec | None], cfg: ProbeConfig) -> dict[str, ResidualFit]:  # noqa: E501
    """Residual allocations fitted on calibration-split files (never the evaluated ones), one per kind of reference."""
    out = {}
    groups = [g for kind in cfg.kinds for g in sessions(lm, cfg, "calibration", kind, cfg.calibration_files)]
    for name, ref in refs.items():
        ds = []
        for group in groups:
            for r, q in PAIRS:
                k, v, pos = span(group[r], cfg.window)
                x = features(codec, k, v, pos)
                ds.append(residual_coefficients(codec, x, reference(codec, ref, group[q], cfg)))
        out[name] = ResidualFit.fit(torch.cat(ds))  # [N, 2, R]
    return out


def fusion(lm, reader: Session, ref: Session, region: tuple[int, int], rule: FusionRule, t: Tallies,  # noqa: PLR0917
           offset: str) -> None:
    """The paper's fusion of the reader's blocks in ``region`` against the reference's context, scored."""
    lo, hi = region
    kf, vf, share = fuse_blocks(reader.k, reader.v, ref.k, ref.v, region=region, rule=rule)
    score(lm, reader, kf[:, lo:hi], vf[:, lo:hi], region=region, tallies=t.score("paper fusion", offset))
    t.value(f"fusion share ({offset})", share)


def storage(lm, codecs: dict[float, KVTCCodec], refs: dict[str, KVTCCodec | None], reader: Session, ref: Session, *,
            fits: dict[str, ResidualFit], cfg: ProbeConfig, t: Tallies, offset: str) -> None:
    """Every way of holding the reader's span (the file less its window), scored."""
    base = next(iter(codecs.values()))
    k, v, pos = span(reader, cfg.window)
    region = (reader.prefix, reader.context - cfg.window)
    for ratio, codec in codecs.items():
        blob = codec.encode(k, v, pos)
        k2, v2, _ = codec.decode(blob)
        score(lm, reader, k2, v2, region=region, tallies=t.score(f"kvtc r{ratio:g}", offset),
              nbytes=kvtc_payload_bytes(codec, blob))
    kq, vq, pq = span(ref, cfg.window)
    score(lm, reader, rerotate(kq, pq, pos, base.spec.ropes), vq, region=region,
          tallies=t.score("reference re-rotated", offset))
    fusion(lm, reader, ref, region, cfg.rule, t, offset)
    x = features(base, k, v, pos)
    c = torch.cat(base.transform(k, v, pos), dim=1)  # [n', R_k + R_v]
    deflate = ZlibDeflate()
    bits = base.artifact.keys.allocation.bits_per_token + base.artifact.values.allocation.bits_per_token
    for name, fit in fits.items():
        xq = reference(base, refs[name], ref, cfg)
        d = residual_coefficients(base, x, xq)  # [n', 2, R]
        t.value(f"residual energy, {name} reference ({offset} offset)", float(d.pow(2).sum() / c.pow(2).sum()))
        for div in cfg.divisors:
            d2, nbytes = code_residual(d, fit.code(int(bits / div) // 2 * 2), deflate)
            k2, v2 = unfeatures(base, *apply_residual(base, xq, d2), pos, k.dtype)
            score(lm, reader, k2, v2, region=region, nbytes=nbytes,
                  tallies=t.score(f"{name} ref + residual, KVTC bits / {div:g}", offset))


def reuse(lm, reader: Session, ref: Session, *, cfg: ProbeConfig, ropes, t: Tallies, offset: str) -> None:
    """The whole file's KV taken from the reference instead of prefilled (re-rotated), scored."""
    early = max(cfg.rule.edge_layers + 1, reader.k.shape[0] // 3)
    for label, skip, layers, rotate in (
        ("reuse, all layers", 0, None, True),
        (f"reuse, first {cfg.recompute} tokens computed", cfg.recompute, None, True),
        (f"reuse, layers < {early} only", 0, early, True),
        ("reuse, not re-rotated (the paper's)", 0, None, False),
    ):
        lo, hi = reader.prefix + skip, reader.context
        k, v = reader.k[:, lo:hi].clone(), reader.v[:, lo:hi].clone()
        kq, vq = ref.k[:, ref.prefix + skip : ref.context], ref.v[:, ref.prefix + skip : ref.context]
        if rotate:
            kq = rerotate(kq, torch.arange(ref.prefix + skip, ref.context), torch.arange(lo, hi), ropes)
        n = layers or k.shape[0]
        k[:n], v[:n] = kq[:n], vq[:n]
        score(lm, reader, k, v, region=(lo, hi), tallies=t.score(label, offset))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL)
    p.add_argument("--artifacts", type=Path, required=True, help="folder with <model>.r<ratio>.kvtc.safetensors")
    p.add_argument("--ratios", type=float, nargs="+", default=[16.0, 20.0, 32.0],
                   help="KVTC ratios to compare; the first one's basis and bits codes the residuals")
    p.add_argument("--reference-ratios", type=float, nargs="*", default=[16.0, 8.0],
                   help="references held as KVTC blobs of these ratios (beside the exact reference)")
    p.add_argument("--files", type=int, default=ProbeConfig.files)
    p.add_argument("--kinds", nargs="+", default=list(ProbeConfig.kinds))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    cfg = ProbeConfig(files=args.files, kinds=tuple(args.kinds))
    t0 = time.perf_counter()
    lm = load_model(args.model, compute_dtype=torch.float32)
    codecs = {r: KVTCCodec(load_artifact(args.artifacts / artifact_name(lm.spec.name, r), expect=lm.spec),
                           entropy=ZlibDeflate(), kernels="torch") for r in args.ratios}
    base = codecs[args.ratios[0]]
    refs: dict[str, KVTCCodec | None] = {"exact": None}
    for r in args.reference_ratios:
        refs[f"r{r:g}-coded"] = codecs.get(r) or KVTCCodec(
            load_artifact(args.artifacts / artifact_name(lm.spec.name, r), expect=lm.spec), entropy=ZlibDeflate(),
            kernels="torch")
    fits = fit_residuals(lm, base, refs, cfg)
    t = Tallies(raw_bytes_per_token=2 * 2 * lm.spec.num_features)
    for kind in cfg.kinds:
        groups = sessions(lm, cfg, "evaluation", kind, cfg.files)
        for f, group in enumerate(groups):
            for r, q in PAIRS:
                offset = "same" if group[r].prefix == group[q].prefix else "different"
                t.similarity(group[r], group[q], base, offset, cfg.rule)
                storage(lm, codecs, refs, group[r], group[q], fits=fits, cfg=cfg, t=t, offset=offset)
                reuse(lm, group[r], group[q], cfg=cfg, ropes=base.spec.ropes, t=t, offset=offset)
            other = groups[(f + 1) % len(groups)][1]  # control: another file, read after another prefix
            t.similarity(group[0], other, base, "control", cfg.rule)
            fusion(lm, group[0], other, (group[0].prefix, group[0].context - cfg.window), cfg.rule, t, "control")
        print(f"{kind}: {len(groups)} files done, {time.perf_counter() - t0:.0f} s", flush=True)
    report = {"model": lm.spec.name, "config": asdict(cfg), "ratios": args.ratios, **t.report(),
              "seconds": round(time.perf_counter() - t0, 1)}
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
