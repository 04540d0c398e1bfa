"""Compression methods compared by the evaluation, each ``[L, T, H, D]`` K/V in -> reconstruction out.

KVTC goes through the real codec (encode to a blob, decode the blob). The baselines are the plain
methods the paper compares against, written here in torch at their textbook settings:

* ``fp8``: cast to float8 e4m3 and back (2x);
* ``kivi{2,4}``: KIVI-style asymmetric quantization, keys per channel over groups of 32 tokens,
  values per token per head, fp16 min and step;
* ``pca-trunc``: the same calibrated PCA basis, keeping the leading ``F / ratio`` coefficients in
  fp16 and dropping the rest (no DP, no quantization);
* ``deflate``: lossless, the 16-bit K/V bytes raw-DEFLATEd as KVTC's entropy stage does (64 KiB chunks,
  zlib level 6): what the entropy stage alone buys.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..codec import KVTCCodec, ZlibDeflate
from ..codec.quant import dequantize_int, quantize_int
from ..codec.tp import PAD, split_heads


@dataclass(frozen=True)
class Result:
    """Reconstruction and its size in bits (``None`` where a method has no entropy stage)."""

    k: torch.Tensor
    v: torch.Tensor
    bits_before_entropy: float
    bits_after_entropy: float | None


Method = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Result]


def kvtc_method(codec: KVTCCodec, keep: str | None = None) -> Method:
    """KVTC through the real codec; ``keep="k"`` or ``"v"`` puts that stream back exact (error split)."""
    if keep not in (None, "k", "v"):
        raise ValueError(f"keep must be None, 'k' or 'v', got {keep!r}")

    def run(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> Result:
        blob = codec.encode(k, v, positions)
        k2, v2, _ = codec.decode(blob)
        k2 = k if keep == "k" else k2
        v2 = v if keep == "v" else v2
        return Result(k2, v2, 8.0 * codec.payload_nbytes(k.shape[1]), 8.0 * blob.numel())

    return run


def tp_kvtc_method(codecs: list[KVTCCodec]) -> Method:
    """KVTC under tensor parallelism: each rank's codec encodes and decodes its own pool heads (zero heads
    padded in included, :mod:`kvtc_sglang.codec.tp`); the model's heads are put back from the ranks that hold
    them. Sizes are the sum over ranks (a padded zero head costs what its rank's budget gives it)."""
    specs = [c.artifact.spec for c in codecs]
    if not codecs or [s.tp_rank for s in specs] != list(range(specs[0].tp_size)):
        raise ValueError(f"need one codec per rank in rank order, got ranks {[s.tp_rank for s in specs]}")

    def run(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> Result:
        k2, v2 = torch.empty_like(k), torch.empty_like(v)  # [L, T, H, D]
        before = after = 0.0
        for codec, spec in zip(codecs, specs, strict=True):
            blob = codec.encode(split_heads(k, spec.tp_heads), split_heads(v, spec.tp_heads), positions)
            kr, vr, _ = codec.decode(blob)  # [L, T, H_r, D]
            for j, h in enumerate(spec.tp_heads):
                if h != PAD:  # a replicated head is put back from each rank holding it: the same codes
                    k2[:, :, h], v2[:, :, h] = kr[:, :, j], vr[:, :, j]
            before += 8.0 * codec.payload_nbytes(k.shape[1])
            after += 8.0 * blob.numel()
        return Result(k2, v2, before, after)

    return run


def fp8_method(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> Result:
    del positions
    cast = [t.to(torch.float8_e4m3fn).to(t.dtype) for t in (k, v)]
    return Result(cast[0], cast[1], 8.0 * (k.numel() + v.numel()), None)


def _kivi_keys(k: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, float]:
    num_l, num_t, num_h, num_d = k.shape
    out = torch.empty_like(k, dtype=torch.float32)
    overhead = 0.0
    for t0 in range(0, num_t, group):
        blk = k[:, t0 : t0 + group].float()  # [L, g, H, D]
        rows = blk.permute(0, 2, 3, 1).reshape(-1, blk.shape[1])  # [L*H*D, g]: per channel over tokens
        codes, lo, step = quantize_int(rows, bits)
        rec = dequantize_int(codes, lo, step).reshape(num_l, num_h, num_d, -1).permute(0, 3, 1, 2)
        out[:, t0 : t0 + group] = rec
        overhead += 32.0 * rows.shape[0]
    return out.to(k.dtype), overhead


def kivi_method(bits: int, group: int = 32) -> Method:
    def run(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> Result:
        del positions
        k2, k_over = _kivi_keys(k, bits, group)
        rows = v.float().reshape(-1, v.shape[-1])  # [L*T*H, D]: per token per head
        codes, lo, step = quantize_int(rows, bits)
        v2 = dequantize_int(codes, lo, step).reshape(v.shape).to(v.dtype)
        bits_total = bits * (k.numel() + v.numel()) + k_over + 32.0 * rows.shape[0]
        return Result(k2, v2, bits_total, None)

    return run


def pca_truncation_method(codec: KVTCCodec, ratio: float) -> Method:
    """Keep the leading ``F / ratio`` PCA coefficients in fp16 (same basis as KVTC, no DP)."""
    f = codec.spec.num_features
    keep = max(1, round(f / ratio))

    def run(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> Result:
        ck, cv = codec.transform(k, v, positions)  # [T, R]
        if min(ck.shape[1], cv.shape[1]) < keep:
            raise ValueError(f"pca-trunc at {ratio}x needs {keep} components, the artifact stores {ck.shape[1]}")
        ck = torch.nn.functional.pad(ck[:, :keep].half().float(), (0, ck.shape[1] - keep))
        cv = torch.nn.functional.pad(cv[:, :keep].half().float(), (0, cv.shape[1] - keep))
        k2, v2 = codec.inverse_transform(ck, cv, positions, k.dtype)
        return Result(k2, v2, 2 * 16.0 * keep * k.shape[1], None)

    return run


def deflate_method(chunk_bytes: int = 1 << 16) -> Method:
    """Lossless baseline: the K and V bytes (as stored, 16-bit) through the codec's raw-DEFLATE stage."""
    coder = ZlibDeflate(level=6, strategy="default")  # zlib's LZ77 + Huffman: raw KV has repeats

    def run(k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> Result:
        del positions
        raw = torch.cat([k.contiguous().view(torch.uint8).reshape(-1), v.contiguous().view(torch.uint8).reshape(-1)])
        comp = coder.compress(list(torch.split(raw, chunk_bytes)))
        return Result(k, v, 8.0 * raw.numel(), 8.0 * sum(c.numel() for c in comp))

    return run
