"""Entropy stage: raw DEFLATE of payload chunks, batched, behind one interface.

Both implementations emit and read the same stream format, a plain DEFLATE bitstream without zlib or
gzip framing (``wbits=-15``), so a blob written on the GPU inflates on the CPU and vice versa.
Integrity (length and CRC32 per chunk) is checked by the blob layer before a chunk reaches a decoder,
because nvCOMP's decoder assumes valid input.
"""

from __future__ import annotations

import importlib.util
import threading
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from .errors import BlobChecksumError


class EntropyCoder(Protocol):
    """Batched lossless coder of uint8 chunks."""

    name: str

    def compress(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each ``[n_i]`` uint8 chunk -> its raw-DEFLATE stream ``[m_i]`` uint8 on the same device."""
        ...

    def decompress(self, chunks: Sequence[torch.Tensor], raw_sizes: Sequence[int]) -> list[torch.Tensor]:
        """Inverse of :meth:`compress`; ``raw_sizes[i]`` is the exact inflated size of chunk ``i``."""
        ...


ZLIB_STRATEGIES = {"huffman": zlib.Z_HUFFMAN_ONLY, "default": zlib.Z_DEFAULT_STRATEGY}


class ZlibDeflate:
    """CPU raw DEFLATE through zlib (``wbits=-15``).

    ``strategy="huffman"`` (the default, ``Z_HUFFMAN_ONLY``) codes each byte with DEFLATE's Huffman tables and
    skips the LZ77 match search: on KVTC payloads (quantized coefficients, nearly no repeated strings) it is
    ~3.5x faster than zlib's default strategy for ~0.5% more bytes (docs/history/serving.md). The stream is
    still plain DEFLATE, so any decoder (zlib, nvCOMP) reads it. ``"default"`` is zlib's LZ77 + Huffman at
    ``level``, for data with repeats (the lossless baseline on raw KV).
    """

    name = "zlib"

    def __init__(self, level: int = 6, strategy: str = "huffman") -> None:
        if not 0 <= level <= 9:
            raise ValueError(f"zlib level must be in [0, 9], got {level}")
        if strategy not in ZLIB_STRATEGIES:
            raise ValueError(f"zlib strategy must be one of {tuple(ZLIB_STRATEGIES)}, got {strategy!r}")
        self.level = level
        self.strategy = strategy

    def compress(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for c in chunks:
            z = zlib.compressobj(self.level, zlib.DEFLATED, -15, 8, ZLIB_STRATEGIES[self.strategy])
            data = z.compress(c.cpu().numpy().tobytes()) + z.flush()
            out.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(c.device))
        return out

    def decompress(self, chunks: Sequence[torch.Tensor], raw_sizes: Sequence[int]) -> list[torch.Tensor]:
        out = []
        for c, size in zip(chunks, raw_sizes, strict=True):
            d = zlib.decompressobj(-15)
            try:
                data = d.decompress(c.cpu().numpy().tobytes(), size)
            except zlib.error as e:
                raise BlobChecksumError(f"DEFLATE stream is invalid: {e}") from e
            if len(data) != size or not d.eof or d.unconsumed_tail:
                raise BlobChecksumError(
                    f"DEFLATE stream inflates to {len(data)} bytes (complete={d.eof}), expected {size}"
                )
            out.append(torch.frombuffer(bytearray(data), dtype=torch.uint8).to(c.device))
        return out


def current_stream_handle(device_index: int) -> int:
    """``cudaStream_t`` (as an int) of torch's current stream on CUDA device ``device_index``."""
    return int(torch.cuda.current_stream(device_index).cuda_stream)


class NvcompDeflate:
    """GPU raw DEFLATE through nvCOMP's Python API (``nvidia-nvcomp-cu12``/``-cu13``), batched.

    One ``encode``/``decode`` call covers every chunk of every blob passed together; the streams are
    plain DEFLATE (``BitstreamKind.RAW``), readable by :class:`ZlibDeflate`.

    Streams: nvCOMP runs on torch's *current* stream of the chunks' device (SGLang's scheduler runs
    under its own stream), so its kernels are ordered after the torch work that made the input and
    before the torch work that reads the output. An nvCOMP ``Codec`` is bound to one stream at
    creation and holds scratch buffers, so one is made per ``(device, stream, thread)`` and kept (at most
    ``MAX_CODECS``, oldest dropped): the encode worker and the scheduler thread never share one. The table
    is guarded by a lock.
    """

    name = "nvcomp"
    MAX_CODECS = 16

    def __init__(self, algorithm_type: int = 1) -> None:
        from nvidia import nvcomp  # noqa: PLC0415  (optional GPU dependency)

        self._nvcomp = nvcomp
        self.algorithm_type = algorithm_type
        self._codecs: dict[tuple[int, int, int], Any] = {}
        self._lock = threading.Lock()

    def codec_for(self, device: torch.device) -> Any:
        """The nvCOMP codec for ``device`` (a CUDA device) on its current torch stream, made on first use."""
        if device.type != "cuda":
            raise ValueError(f"nvCOMP needs CUDA tensors, got a tensor on {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, current_stream_handle(index), threading.get_ident())
        with self._lock:
            codec = self._codecs.get(key)
            if codec is None:
                if len(self._codecs) >= self.MAX_CODECS:
                    del self._codecs[next(iter(self._codecs))]
                codec = self._codecs[key] = self._nvcomp.Codec(
                    algorithm="Deflate",
                    bitstream_kind=self._nvcomp.BitstreamKind.RAW,
                    algorithm_type=self.algorithm_type,
                    device_id=index,
                    cuda_stream=key[1],
                )
        return codec

    @staticmethod
    def _to_torch(arr: Any, device: torch.device) -> torch.Tensor:
        out = torch.utils.dlpack.from_dlpack(arr.to_dlpack())
        return out.reshape(-1).view(torch.uint8).to(device).clone()

    def compress(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if not chunks:
            return []
        batch = self._nvcomp.as_arrays([c.contiguous() for c in chunks])
        encoded = self.codec_for(chunks[0].device).encode(batch)
        return [self._to_torch(encoded[i], chunks[i].device) for i in range(len(chunks))]

    def decompress(self, chunks: Sequence[torch.Tensor], raw_sizes: Sequence[int]) -> list[torch.Tensor]:
        if not chunks:
            return []
        # nvCOMP wants 4-byte aligned inputs; chunks sliced out of a blob can start anywhere.
        batch = self._nvcomp.as_arrays([c if c.data_ptr() % 8 == 0 else c.clone() for c in chunks])
        decoded = self.codec_for(chunks[0].device).decode(batch, "|u1")
        out = [self._to_torch(decoded[i], chunks[i].device) for i in range(len(chunks))]
        for o, size in zip(out, raw_sizes, strict=True):
            if o.numel() != size:
                raise BlobChecksumError(f"nvCOMP inflated {o.numel()} bytes, expected {size}")
        return out


def nvcomp_available() -> bool:
    """True when the optional ``nvidia-nvcomp`` package is importable."""
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.nvcomp") is not None


def default_entropy_coder(device: torch.device) -> EntropyCoder:
    """nvCOMP for CUDA devices, zlib otherwise; a CUDA device without nvCOMP is an error, not a fallback."""
    if device.type == "cuda":
        if not nvcomp_available():
            raise RuntimeError(
                "CUDA tensors need nvCOMP for the entropy stage: pip install 'kvtc-sglang[gpu]' "
                "(nvidia-nvcomp-cu12 or -cu13), or pass entropy=ZlibDeflate() explicitly"
            )
        return NvcompDeflate()
    return ZlibDeflate()
