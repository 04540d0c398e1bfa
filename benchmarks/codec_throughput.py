"""Encode/decode throughput of the codec in MB/s of 16-bit K/V, next to zlib alone on the same bytes.

CPU (default model, real K/V from held-out text)::

    python benchmarks/codec_throughput.py --artifact artifacts/smollm2-135m-instruct.r16.kvtc.safetensors
    python benchmarks/codec_throughput.py --artifact ... --dot-precision bf16 --threads 1   # the CPU server's

GPU, from a bundle made by ``benchmarks/gpu_bundle.py``::

    python benchmarks/codec_throughput.py --device cuda --bundle gpu_bundle --tokens 1024 8192

Larger token counts tile the bundle's real K/V (positions stay distinct). Timings are medians of
``--repeat`` runs; on CUDA each phase is synchronised.
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib
from pathlib import Path

import torch

from kvtc_sglang.codec import KVTCCodec, load_artifact


def _time(fn, repeat: int, device: torch.device) -> float:
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def load_kv(args) -> tuple:
    if args.bundle:
        from safetensors.torch import load_file

        art = load_artifact(next(args.bundle.glob("*.kvtc.safetensors")))
        kv = load_file(str(args.bundle / "kv.safetensors"))
        return art, kv["k"], kv["v"]
    from kvtc_sglang.calibration.corpus import token_sequences
    from kvtc_sglang.calibration.model import load_default_model, prefill_kv

    lm = load_default_model()
    art = load_artifact(args.artifact, expect=lm.spec)
    seqs, _ = token_sequences(lm.tokenizer, "evaluation", "prose", 2048, 2048)
    k, v, _ = prefill_kv(lm.model, seqs[0])
    return art, k, v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", type=Path)
    p.add_argument("--bundle", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--kernels", choices=("auto", "torch", "triton"), default="auto", help="auto: Triton on CUDA")
    p.add_argument("--dot-precision", default="ieee", help="ieee; bf16 (torch backend); tf32x3, tf32 (Triton)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args()
    if not (args.artifact or args.bundle):
        p.error("give --artifact or --bundle")
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    art, k0, v0 = load_kv(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    codec = KVTCCodec(art, kernels=args.kernels, dot_precision=args.dot_precision)
    print(
        f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, artifact r{art.target_ratio:g}, "
        f"threads {torch.get_num_threads()}, {'triton' if codec.uses_triton(device) else 'torch'} kernels, "
        f"{args.dot_precision} projections"
    )
    print(
        "| tokens | KV MB (16-bit) | encode MB/s | decode MB/s | entropy share enc / dec | zlib-6 alone MB/s | "
        "ratio after DEFLATE |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in args.tokens:
        reps = -(-n // k0.shape[1])
        k = k0.repeat(1, reps, 1, 1)[:, :n].to(device)  # [L, n, H, D]
        v = v0.repeat(1, reps, 1, 1)[:, :n].to(device)
        pos = torch.arange(n, device=device)
        mb = 2 * k.numel() * 2 / 1e6
        codec.encode(k, v, pos)  # warm-up (basis to device, kernels)
        t_enc = _time(lambda k=k, v=v, pos=pos: codec.encode(k, v, pos), args.repeat, device)
        blob = codec.encode(k, v, pos)
        t_dec = _time(lambda blob=blob: codec.decode(blob), args.repeat, device)
        payload = codec.quantize(*codec.transform(k, v, pos))
        chunks = list(torch.split(payload, codec.chunk_bytes))
        coder = codec._coder(device)
        comp = coder.compress(chunks)
        t_ent_c = _time(lambda coder=coder, chunks=chunks: coder.compress(chunks), args.repeat, device)
        sizes = [c.numel() for c in chunks]
        t_ent_d = _time(lambda coder=coder, comp=comp, sizes=sizes: coder.decompress(comp, sizes), args.repeat, device)
        raw = torch.cat([k.flatten(), v.flatten()]).to(torch.float16).cpu().numpy().tobytes()
        t_zlib = _time(lambda raw=raw: zlib.compress(raw, 6), 1, torch.device("cpu"))
        print(
            f"| {n} | {mb:.1f} | {mb / t_enc:.0f} | {mb / t_dec:.0f} | {100 * t_ent_c / t_enc:.0f}% / "
            f"{100 * t_ent_d / t_dec:.0f}% | {mb / t_zlib:.0f} | {mb * 1e6 / blob.numel():.1f}x |"
        )


if __name__ == "__main__":
    main()
