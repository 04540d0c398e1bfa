"""CRC-32 throughput: zlib (host) vs the torch CRC of ``kvtc_sglang.codec.crc`` (on the tensors' device).

The blob layer checks chunk CRCs with :func:`~kvtc_sglang.codec.crc.crc32_many`: zlib for CPU tensors,
torch ops on a GPU (no device-to-host copy of the blob). This measures both on the same chunks, as a blob
has them (``--chunks`` chunks of ``--chunk-kb`` KiB, checked in one batch), and prints MB/s and ratios::

    python benchmarks/crc_bench.py                 # CPU; adds CUDA rows when a GPU is present
    python benchmarks/crc_bench.py --chunk-kb 4 --chunks 256 --threads 2

On CUDA two zlib figures are given: zlib on bytes already on the host, and zlib including the
device-to-host copy of the chunks, which is what checking a GPU blob on the host used to cost.
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib

import torch

from kvtc_sglang.codec.crc import crc32_many


def _median_s(fn, repeat: int, cuda: bool) -> float:
    fn()  # warm-up (tables, kernels)
    times = []
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk-kb", type=int, default=64, help="KiB per chunk (a 64 KiB payload chunk DEFLATEs to ~50)")
    ap.add_argument("--chunks", type=int, default=16, help="chunks per batch (one crc32_many call)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (zlib uses one)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.chunk_kb * 1024
    host = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for _ in range(args.chunks)]
    mb = n * args.chunks / 1e6
    expect = [zlib.crc32(c.numpy().tobytes()) for c in host]
    rows: list[tuple[str, float]] = []
    t_zlib = _median_s(lambda: crc32_many(host, "zlib"), args.repeat, False)
    rows.append(("cpu zlib", mb / t_zlib))
    if crc32_many(host, "torch") != expect:
        raise RuntimeError("torch CRC on the CPU differs from zlib")
    rows.append(("cpu torch", mb / _median_s(lambda: crc32_many(host, "torch"), args.repeat, False)))
    if torch.cuda.is_available():
        dev = [c.cuda() for c in host]
        if crc32_many(dev) != expect:
            raise RuntimeError("torch CRC on CUDA differs from zlib")
        rows.append(("cuda torch", mb / _median_s(lambda: crc32_many(dev), args.repeat, True)))
        via_host = _median_s(lambda: crc32_many([c.cpu() for c in dev]), args.repeat, True)
        rows.append(("cuda->host + zlib", mb / via_host))
    print(f"{args.chunks} chunks x {args.chunk_kb} KiB = {mb:.1f} MB per batch, median of {args.repeat}, "
          f"{args.threads} torch thread(s)")  # fmt: skip
    print("| path | MB/s | vs cpu zlib |")
    print("|---|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.0f} | {rate / rows[0][1]:.3g}x |")


if __name__ == "__main__":
    main()
