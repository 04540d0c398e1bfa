"""Triton kernels on a GPU: throughput vs roofline, nvCOMP throughput, restore vs prefill recompute.

Reads a bundle made by ``benchmarks/gpu_bundle.py`` (real artifact, real K/V, the model's config); one
``--phase`` per call, so ``benchmarks/gpu_check.py`` can give each its own time budget::

    python benchmarks/gpu_kernels.py --bundle gpu_bundle --phase kernels --precision ieee tf32x3 tf32
    python benchmarks/gpu_kernels.py --bundle gpu_bundle --phase nvcomp
    python benchmarks/gpu_kernels.py --bundle gpu_bundle --phase restore --tokens 1024 4096 8192 32768

For each prefix length ``T`` (the bundle's real K/V tiled to ``T`` tokens, written into a bf16 KV pool at
page-16 slots):

* ``kernels``: encode (``project`` + ``quant_pack``, both streams) and decode (``decode_into``) kernel time,
  GB/s of 16-bit K/V, and the fraction of the roofline ``max(bytes / HBM bandwidth, FLOPs / peak)`` with the
  kernel's bytes (K/V, basis once, coefficients, payload) and FLOPs (``2 T F (R_k + R_v)``); the peak follows
  ``--precision``: fp32 FMA for "ieee", the TF32 tensor-core peak for "tf32", a third of it for "tf32x3";
* ``nvcomp``: nvCOMP deflate and inflate of the payload's chunks (GB/s of raw payload, compression ratio)
  and their share of a whole encode (``encode_rows``) and a whole restore (``decode_rows``);
* ``restore``: restore (CRC check, nvCOMP inflate, decode kernel into the pool) versus the prefill of the
  same architecture on the same GPU (``LlamaForCausalLM`` from the bundled config, random weights, last
  token's logits only: prefill time does not depend on the weight values).

Timings are medians of ``--repeat`` synchronised runs after a warm-up. ``--json`` is rewritten after every
row, so a run stopped at its time budget keeps what it measured. ``--smoke`` runs on the CPU under
``TRITON_INTERPRET=1`` (timings meaningless) to check the script.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from kvtc_sglang.codec import KVTCCodec, load_artifact
from kvtc_sglang.triton_kernels import DOT_PRECISIONS

# name fragment -> (HBM bytes/s, fp32 FMA FLOP/s, dense TF32 tensor FLOP/s), vendors' data sheets
DEVICES = {
    "H100 PCIe": (2.0e12, 51.2e12, 378e12),
    "H100": (3.35e12, 66.9e12, 494.7e12),  # SXM5 / HBM3
    "H200": (4.8e12, 66.9e12, 494.7e12),
}
PHASES = ("kernels", "nvcomp", "restore")
DEVICE = torch.device("cuda")
WARMUP = True  # off in smoke runs: the interpreter compiles nothing, and every call costs seconds


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median seconds of ``repeat`` synchronised calls of ``fn``, after one warm-up call."""
    if WARMUP:
        fn()
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_peaks(name: str, precision: str, hbm: float | None, flops: float | None) -> tuple[float, float]:
    """HBM bytes/s and the FLOP/s peak of the kernels' dot precision (overrides win)."""
    for frag, (bw, fp32, tf32) in DEVICES.items():
        if frag in name:
            peak = {"ieee": fp32, "tf32": tf32, "tf32x3": tf32 / 3}[precision]
            return hbm or bw, flops or peak
    if hbm is None or flops is None:
        raise ValueError(f"unknown device {name!r}: pass --hbm-gbs and --peak-tflops")
    return hbm, flops


def pool_with(k: torch.Tensor, v: torch.Tensor, page: int = 16):
    """``L x [N, H, D]`` K/V buffers holding ``[L, T, H, D]`` K/V at shuffled page-aligned slots."""
    num_l, num_t, heads, dim = k.shape
    n_pages = -(-num_t // page) + 8
    perm = torch.randperm(n_pages, generator=torch.Generator().manual_seed(0))[: -(-num_t // page)]
    slots = ((perm[:, None] * page + torch.arange(page)).reshape(-1)[:num_t]).to(DEVICE)
    kb = [torch.zeros(n_pages * page, heads, dim, dtype=k.dtype, device=DEVICE) for _ in range(num_l)]
    vb = [torch.zeros_like(b) for b in kb]
    for layer in range(num_l):
        kb[layer][slots] = k[layer]
        vb[layer][slots] = v[layer]
    return kb, vb, slots


def prefill_seconds(config: dict, num_t: int, repeat: int) -> float:
    """Prefill of ``num_t`` tokens by ``config``'s architecture (random weights, bf16, SDPA attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    cfg = LlamaConfig(**{**config, "max_position_embeddings": max(num_t, config.get("max_position_embeddings", 0))})
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).to(device=DEVICE, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, num_t), device=DEVICE)
    with torch.inference_mode():
        try:  # the last token's logits, as a server's prefill computes them
            return timed(lambda: model(ids, use_cache=True, logits_to_keep=1), repeat)
        except TypeError:  # transformers before 4.50
            return timed(lambda: model(ids, use_cache=True), repeat)


def measure(codec: KVTCCodec, k0: torch.Tensor, v0: torch.Tensor, num_t: int, *, repeat: int, phase: str,
            config: dict | None) -> dict[str, float]:  # fmt: skip
    """Seconds of ``phase``'s steps for ``num_t`` tokens (``k0``/``v0`` ``[L, T0, H, D]`` tiled), plus sizes."""
    backend = codec.payload_backend(DEVICE)  # the Triton backend: project + quant_pack, decode_into
    reps = -(-num_t // k0.shape[1])
    k = k0.repeat(1, reps, 1, 1)[:, :num_t].to(DEVICE)  # [L, T, H, D]
    v = v0.repeat(1, reps, 1, 1)[:, :num_t].to(DEVICE)
    pos = torch.arange(num_t)
    kb, vb, slots = pool_with(k, v)
    payload = backend.encode_rows(kb, vb, slots, pos)
    m = {"kv_bytes": 2 * k.numel() * k.element_size(), "payload_bytes": payload.numel()}
    del k, v
    if phase == "kernels":
        m["encode_kernels"] = timed(lambda: backend.encode_rows(kb, vb, slots, pos), repeat)
        m["decode_kernels"] = timed(lambda: backend.decode_rows(payload, kb, vb, slots, pos), repeat)
        return m
    blob = codec.encode_rows(kb, vb, slots, pos)
    m["blob_bytes"] = blob.numel()
    m["restore"] = timed(lambda: codec.decode_rows(blob, kb, vb, slots, pos), repeat)
    if phase == "nvcomp":
        chunks = list(torch.split(payload, codec.chunk_bytes))
        coder = codec._coder(payload.device)
        comp = coder.compress(chunks)
        m["compressed_bytes"] = sum(c.numel() for c in comp)
        m["encode_rows"] = timed(lambda: codec.encode_rows(kb, vb, slots, pos), repeat)
        m["nvcomp_compress"] = timed(lambda: coder.compress(chunks), repeat)
        m["nvcomp_decompress"] = timed(lambda: coder.decompress(comp, [c.numel() for c in chunks]), repeat)
    else:
        m["prefill"] = prefill_seconds(config, num_t, repeat) if config is not None else float("nan")
    return m


def derive(m: dict, phase: str, *, feat: int, rk: int, rv: int, hbm: float, peak: float) -> dict:
    """Throughputs, roofline fractions, ratios and shares of one measured row."""
    if phase == "kernels":
        num_t = m["tokens"]
        flops = 2 * num_t * feat * (rk + rv)
        basis, coeffs = 4 * feat * (rk + rv), 4 * num_t * (rk + rv)
        enc_roof = max((m["kv_bytes"] + basis + 2 * coeffs + m["payload_bytes"]) / hbm, flops / peak)
        dec_roof = max((m["kv_bytes"] + basis + m["payload_bytes"]) / hbm, flops / peak)
        return {"encode_gbs": m["kv_bytes"] / 1e9 / m["encode_kernels"],
                "decode_gbs": m["kv_bytes"] / 1e9 / m["decode_kernels"],
                "encode_roofline": enc_roof / m["encode_kernels"], "decode_roofline": dec_roof / m["decode_kernels"]}
    if phase == "nvcomp":
        return {"compress_gbs": m["payload_bytes"] / 1e9 / m["nvcomp_compress"],
                "decompress_gbs": m["payload_bytes"] / 1e9 / m["nvcomp_decompress"],
                "deflate_ratio": m["payload_bytes"] / m["compressed_bytes"],
                "nvcomp_share_encode": m["nvcomp_compress"] / m["encode_rows"],
                "nvcomp_share_restore": m["nvcomp_decompress"] / m["restore"]}  # fmt: skip
    return {"prefill_over_restore": m["prefill"] / m["restore"]}


def run(bundle: Path, tokens: list[int], repeat: int, *, phase: str = "kernels", precision: str = "ieee",
        hbm: float | None = None, peak_flops: float | None = None,
        on_row: Callable[[dict], None] | None = None) -> dict:  # fmt: skip
    """Measure ``phase`` at every ``T`` in ``tokens`` on ``DEVICE``: ``{"device", "phase", ..., "rows"}``."""
    from safetensors.torch import load_file  # noqa: PLC0415

    art = load_artifact(next(bundle.glob("*.kvtc.safetensors")))
    kv = load_file(str(bundle / "kv.safetensors"))
    cfg_path = bundle / "config.json"
    config = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
    name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "H100 (smoke run on the CPU)"
    hbm, peak = device_peaks(name, precision, hbm, peak_flops)
    codec = KVTCCodec(art, kernels="triton", dot_precision=precision)
    rk, rv, feat = art.keys.allocation.rank, art.values.allocation.rank, art.spec.num_features
    result = {"device": name, "phase": phase, "precision": precision, "hbm_bytes_per_s": hbm, "peak_flops": peak,
              "artifact_ratio": art.target_ratio, "features": feat, "rank_k": rk, "rank_v": rv,
              "torch": torch.__version__, "rows": []}  # fmt: skip
    for num_t in tokens:
        m = {"tokens": num_t, **measure(codec, kv["k"], kv["v"], num_t, repeat=repeat, phase=phase, config=config)}
        result["rows"].append(m | derive(m, phase, feat=feat, rk=rk, rv=rv, hbm=hbm, peak=peak))
        if on_row is not None:
            on_row(result)
    return result


def markdown(result: dict) -> str:
    """The result of :func:`run` as a table."""
    head = (f"{result['phase']} on {result['device']}, {result['precision']}; roofline "
            f"{result['hbm_bytes_per_s'] / 1e12:.2f} TB/s, {result['peak_flops'] / 1e12:.1f} TFLOP/s; artifact "
            f"r{result['artifact_ratio']:g}, F={result['features']}, R_k={result['rank_k']}, R_v={result['rank_v']}, "
            f"torch {result['torch']}")  # fmt: skip
    cols: dict[str, tuple[str, Callable[[dict], str]]] = {
        "kernels": ("| T | KV MB | encode ms | GB/s | roofline | decode ms | GB/s | roofline |", lambda r: (
            f"| {r['tokens']} | {r['kv_bytes'] / 1e6:.0f} | {1e3 * r['encode_kernels']:.3f} | {r['encode_gbs']:.0f} "
            f"| {100 * r['encode_roofline']:.0f}% | {1e3 * r['decode_kernels']:.3f} | {r['decode_gbs']:.0f} | "
            f"{100 * r['decode_roofline']:.0f}% |")),
        "nvcomp": ("| T | payload MB | deflate ms | GB/s | inflate ms | GB/s | ratio | share enc / restore |",
                   lambda r: (f"| {r['tokens']} | {r['payload_bytes'] / 1e6:.1f} | {1e3 * r['nvcomp_compress']:.3f} "
                              f"| {r['compress_gbs']:.1f} | {1e3 * r['nvcomp_decompress']:.3f} | "
                              f"{r['decompress_gbs']:.1f} | {r['deflate_ratio']:.2f} | "
                              f"{100 * r['nvcomp_share_encode']:.0f}% / {100 * r['nvcomp_share_restore']:.0f}% |")),
        "restore": ("| T | KV MB | blob MB | restore ms | prefill ms | prefill / restore |", lambda r: (
            f"| {r['tokens']} | {r['kv_bytes'] / 1e6:.0f} | {r['blob_bytes'] / 1e6:.1f} | {1e3 * r['restore']:.3f} | "
            f"{1e3 * r['prefill']:.2f} | {r['prefill_over_restore']:.1f}x |")),
    }  # fmt: skip
    header, row = cols[result["phase"]]
    return "\n".join([head, "", header, "|" + "---|" * (header.count("|") - 1), *map(row, result["rows"])])


def use_cpu_for_smoke() -> None:
    """Run on the CPU (Triton's interpreter must already be on): checks the script, timings meaningless."""
    global DEVICE, WARMUP  # noqa: PLW0603 (one switch for the whole script)
    DEVICE, WARMUP = torch.device("cpu"), False


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--phase", choices=PHASES, default="kernels")
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192, 32768])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--hbm-gbs", type=float, help="HBM bandwidth in GB/s (default: from the device name)")
    p.add_argument("--peak-tflops", type=float, help="peak of the dot precision in TFLOP/s (default: device name)")
    p.add_argument("--precision", choices=DOT_PRECISIONS, nargs="+", default=["ieee"], help="tl.dot precisions")
    p.add_argument("--json", type=Path, help="write the measurements here (after every row)")
    p.add_argument("--smoke", action="store_true", help="CPU + TRITON_INTERPRET=1: check the script, not speed")
    args = p.parse_args(argv)
    if args.smoke:
        use_cpu_for_smoke()
    elif not torch.cuda.is_available():
        p.error("needs a CUDA GPU (or --smoke)")
    done: list[dict] = []

    def save(partial: dict) -> None:
        if args.json:
            args.json.write_text(json.dumps({"results": [*done, partial | {"markdown": markdown(partial)}]}, indent=1))

    for precision in args.precision:
        result = run(args.bundle, args.tokens, args.repeat, phase=args.phase, precision=precision,
                     hbm=args.hbm_gbs and args.hbm_gbs * 1e9, peak_flops=args.peak_tflops and args.peak_tflops * 1e12,
                     on_row=save)  # fmt: skip
        done.append(result | {"markdown": markdown(result)})
        print(done[-1]["markdown"], flush=True)
    if args.json:
        args.json.write_text(json.dumps({"results": done}, indent=1))


if __name__ == "__main__":
    main()
