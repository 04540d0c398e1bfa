"""Accuracy and bytes of joint encoding as the cache stores it: a file's copy coded as a residual against a reference
blob made from another session's copy (``codec/joint.py``, the served residual calibration), against KVTC coding the
copy alone, on evaluation-split text.

Each file (code and prose) is read by three sessions after three different histories (so at three offsets). The
first session's copy (less the last ``window`` tokens, which the cache keeps exact) becomes the reference blob; the
other two are coded as residuals against it. Every method is scored by the KL, top-1 and NLL change of the file's next
128 tokens against the exact cache (``eval/joint_sessions.score``), and by its bytes per token.

    .venv/bin/python benchmarks/joint_accuracy.py \\
        --calibration out/joint/cal/smollm2-135m-instruct.r16.kvtc.safetensors \\
        --joint out/joint/cal/smollm2-135m-instruct.r8.residual.safetensors \\
        --json benchmarks/results/joint_accuracy_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvtc_sglang.calibration.model import DEFAULT_MODEL, MODELS, load_model
from kvtc_sglang.codec import KVTCCodec, ZlibDeflate, load_artifact
from kvtc_sglang.codec.joint import ResidualSource, load_joint, reference_tag
from kvtc_sglang.eval.joint_sessions import Score, open_session, score, token_docs

PREFIXES = (300, 450, 600)  # history tokens before the file: three offsets
FILE_TOKENS, CONTINUATION, WINDOW = 1200, 128, 128


def rows(k: torch.Tensor, v: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``[L, T, H, D]`` K/V as a pool's per-layer buffers (slots ``0..T-1``)."""
    return list(k.clone().unbind(0)), list(v.clone().unbind(0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL)
    p.add_argument("--calibration", type=Path, required=True, help="the served KVTC calibration (kvtc alone)")
    p.add_argument("--joint", type=Path, required=True, help="the residual calibration (--kvtc-joint-calibration)")
    p.add_argument("--files", type=int, default=2, help="files per kind")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    lm = load_model(args.model, compute_dtype=torch.float32)
    plain = KVTCCodec(load_artifact(args.calibration, expect=lm.spec), entropy=ZlibDeflate(), kernels="torch")
    jc = load_joint(args.joint, expect=lm.spec, entropy=ZlibDeflate(), kernels="torch")
    tallies = {name: Score() for name in ("kvtc alone", "reference blob (first copy)", "residual vs reference")}
    prefix_doc = token_docs(lm, "evaluation", "prose", 1, min_tokens=max(PREFIXES) + 1, skip=args.files)[0]
    ref_bytes = ref_tokens = 0
    for kind in ("code", "prose"):
        for file in token_docs(lm, "evaluation", kind, args.files, min_tokens=FILE_TOKENS + CONTINUATION + 1):
            sessions = [open_session(lm, prefix_doc[:n], file, FILE_TOKENS, CONTINUATION) for n in PREFIXES]
            spans = [(s.prefix, s.context - WINDOW) for s in sessions]
            first, (lo0, hi0) = sessions[0], spans[0]
            pos0 = torch.arange(lo0, hi0)
            c0 = jc.reference.transform(first.k[:, lo0:hi0], first.v[:, lo0:hi0], pos0)
            ref_blob, ref_c = jc.encode_reference(c0, pos0, first.k.dtype)
            header = jc.reference.read_header(ref_blob)
            ref_bytes, ref_tokens = ref_bytes + ref_blob.numel(), ref_tokens + hi0 - lo0
            kr, vr = rows(first.k[:, lo0:hi0], first.v[:, lo0:hi0])
            jc.reference.decode_rows(ref_blob, kr, vr, torch.arange(hi0 - lo0), pos0)
            score(lm, first, torch.stack(kr), torch.stack(vr), region=spans[0],
                  tallies=[tallies["reference blob (first copy)"]], nbytes=ref_blob.numel())
            for s, (lo, hi) in zip(sessions[1:], spans[1:], strict=True):
                pos = torch.arange(lo, hi)
                k, v = s.k[:, lo:hi], s.v[:, lo:hi]
                blob = plain.encode(k, v, pos)
                k2, v2, _ = plain.decode(blob)
                score(lm, s, k2, v2, region=(lo, hi), tallies=[tallies["kvtc alone"]], nbytes=blob.numel())
                c = jc.reference.transform(k, v, pos)
                (res,) = jc.encode_residuals([c], [ref_c], [reference_tag(header, 0, hi - lo)], [pos], k.dtype)
                target = (torch.arange(hi - lo), pos)
                got = jc.read_residuals([ResidualSource(res, ref_blob, header, 0, hi - lo)], [target], k.device)
                kq, vq = rows(k, v)
                jc.write_rows(got, kq, vq, [target])
                score(lm, s, torch.stack(kq), torch.stack(vq), region=(lo, hi),
                      tallies=[tallies["residual vs reference"]], nbytes=res.numel())
        print(f"{kind} done, {time.perf_counter() - t0:.0f} s", flush=True)
    raw = 2 * 2 * lm.spec.num_features
    report = {"model": lm.spec.name, "calibration": args.calibration.name, "joint": args.joint.name,
              "prefixes": PREFIXES, "file_tokens": FILE_TOKENS, "window": WINDOW, "files_per_kind": args.files,
              "methods": {name: t.report(raw) for name, t in tallies.items()},
              "reference_bytes_per_token": ref_bytes / ref_tokens, "seconds": round(time.perf_counter() - t0, 1)}
    kvtc = report["methods"]["kvtc alone"]["bytes_per_token"]
    residual = report["methods"]["residual vs reference"]["bytes_per_token"]
    for copies in (2, 3, 4, 8):  # as the cache stores n copies: the first plain, the second makes the reference
        joint_bytes = kvtc + report["reference_bytes_per_token"] + (copies - 1) * residual
        report[f"kvtc_alone_over_joint_bytes_{copies}_copies"] = copies * kvtc / joint_bytes
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
