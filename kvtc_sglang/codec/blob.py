"""Binary container of one encoded KV segment: header, chunk table, positions, DEFLATE chunks.

Layout (little endian)::

    0   magic "KVTC"            4s
    4   format version          u16
    6   flags                   u16   bit 0: positions are explicit int32 (else start + arange)
    8   header CRC32            u32   over bytes [12, header_end)
    12  artifact id             8s    calibration fingerprint
    20  L, H, D                 3 x u16
    26  dtype code, reserved    2 x u8
    28  T                       u32
    32  first position          i32
    36  number of chunks        u32
    40  chunk table             n x (compressed len u32, raw len u32, CRC32 of compressed bytes u32)
    ..  positions               T x i32, only with flag bit 0
    ..  chunks                  concatenated raw-DEFLATE streams
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import torch

from .errors import BlobCalibrationMismatchError, BlobChecksumError, BlobTruncatedError, BlobVersionError

MAGIC = b"KVTC"
BLOB_VERSION = 2  # 2: each component's row of packed codes starts on a byte
_FIXED = struct.Struct("<4sHHI8sHHHBBIiI")
_CHUNK = struct.Struct("<III")
FLAG_EXPLICIT_POSITIONS = 1
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


@dataclass(frozen=True)
class BlobHeader:
    """Parsed fixed header and chunk table of a blob."""

    artifact_id: bytes
    num_layers: int
    num_heads: int
    head_dim: int
    dtype: torch.dtype
    positions: torch.Tensor  # [T] int64, CPU
    chunks: tuple[tuple[int, int, int], ...]  # (compressed len, raw len, crc32)
    data_offset: int

    @property
    def num_tokens(self) -> int:
        return int(self.positions.numel())


def header_nbytes(num_tokens: int, num_chunks: int, explicit_positions: bool) -> int:
    return _FIXED.size + num_chunks * _CHUNK.size + (4 * num_tokens if explicit_positions else 0)


def _contiguous_start(positions: torch.Tensor) -> int | None:
    if positions.numel() == 0:
        return 0
    start = int(positions[0])
    expect = torch.arange(start, start + positions.numel(), dtype=torch.int64)
    return start if torch.equal(positions.cpu().to(torch.int64), expect) else None


def build_header(
    artifact_id: bytes,
    shape: tuple[int, int, int],
    dtype: torch.dtype,
    positions: torch.Tensor,
    chunks: list[tuple[int, int, int]],
) -> bytes:
    """Serialize the header for ``positions [T]`` and the chunk table; the CRC is filled in here."""
    start = _contiguous_start(positions)
    flags = 0 if start is not None else FLAG_EXPLICIT_POSITIONS
    lo, hi = int(positions.min()) if positions.numel() else 0, int(positions.max()) if positions.numel() else 0
    if lo < 0 or hi >= 2**31:
        raise ValueError(f"positions must be in [0, 2**31), got range [{lo}, {hi}]")
    num_l, num_h, num_d = shape
    fixed = _FIXED.pack(
        MAGIC,
        BLOB_VERSION,
        flags,
        0,
        artifact_id,
        num_l,
        num_h,
        num_d,
        DTYPE_CODES[dtype],
        0,
        positions.numel(),
        start or 0,
        len(chunks),
    )
    body = b"".join(_CHUNK.pack(*c) for c in chunks)
    if flags & FLAG_EXPLICIT_POSITIONS:
        body += positions.cpu().to(torch.int32).numpy().tobytes()
    crc = zlib.crc32(fixed[12:] + body)
    return fixed[:8] + struct.pack("<I", crc) + fixed[12:] + body


def parse_header(blob: bytes, expect_artifact_id: bytes) -> BlobHeader:
    """Validate and parse; raises a :class:`~kvtc_sglang.codec.errors.BlobError` subclass on any defect."""
    if len(blob) < _FIXED.size:
        raise BlobTruncatedError(f"blob has {len(blob)} bytes, the fixed header alone needs {_FIXED.size}")
    magic, version, flags, crc, art_id, num_l, num_h, num_d, dcode, _, num_t, start, n_chunks = _FIXED.unpack_from(blob)
    if magic != MAGIC:
        raise BlobVersionError(f"not a KVTC blob: magic {magic!r}, expected {MAGIC!r}")
    if version != BLOB_VERSION:
        raise BlobVersionError(f"blob format version {version}, this decoder reads version {BLOB_VERSION}")
    explicit = bool(flags & FLAG_EXPLICIT_POSITIONS)
    hdr_len = header_nbytes(num_t, n_chunks, explicit)
    if len(blob) < hdr_len:
        raise BlobTruncatedError(f"blob has {len(blob)} bytes, its header needs {hdr_len}")
    if zlib.crc32(blob[12:hdr_len]) != crc:
        raise BlobChecksumError("blob header CRC32 mismatch")
    if art_id != expect_artifact_id:
        raise BlobCalibrationMismatchError(
            f"blob was encoded with calibration {art_id.hex()}, decoder holds {expect_artifact_id.hex()}"
        )
    if dcode not in CODE_DTYPES:
        raise BlobVersionError(f"unknown dtype code {dcode} in blob header")
    chunks = tuple(_CHUNK.unpack_from(blob, _FIXED.size + i * _CHUNK.size) for i in range(n_chunks))
    if explicit:
        off = _FIXED.size + n_chunks * _CHUNK.size
        positions = torch.frombuffer(bytearray(blob[off : off + 4 * num_t]), dtype=torch.int32).to(torch.int64)
    else:
        positions = torch.arange(start, start + num_t, dtype=torch.int64)
    total = hdr_len + sum(c[0] for c in chunks)
    if len(blob) != total:
        raise BlobTruncatedError(f"blob has {len(blob)} bytes, header and chunk table say {total}")
    return BlobHeader(art_id, num_l, num_h, num_d, CODE_DTYPES[dcode], positions, chunks, hdr_len)


def verify_chunks(blob: bytes, header: BlobHeader) -> list[tuple[int, int]]:
    """Check each chunk's CRC32; returns ``(offset, length)`` of every chunk."""
    spans = []
    off = header.data_offset
    for i, (clen, _, crc) in enumerate(header.chunks):
        if zlib.crc32(blob[off : off + clen]) != crc:
            raise BlobChecksumError(f"chunk {i} CRC32 mismatch")
        spans.append((off, clen))
        off += clen
    return spans
