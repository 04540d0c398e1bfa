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
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .crc import crc32_many
from .errors import (
    BlobCalibrationMismatchError,
    BlobChecksumError,
    BlobError,
    BlobTruncatedError,
    BlobVersionError,
)

MAGIC = b"KVTC"
BLOB_VERSION = 2  # 2: each component's row of packed codes starts on a byte
_FIXED = struct.Struct("<4sHHI8sHHHBBIiI")
_CHUNK = struct.Struct("<III")
FLAG_EXPLICIT_POSITIONS = 1
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}
_HEAD_PREFIX = 4096  # bytes copied to the host to read a header: fixed part + 338 chunk entries


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


def header_bytes(blob: torch.Tensor) -> bytes:
    """The header of a blob ``[n] uint8`` (any device) as host bytes, without copying the chunks.

    Copies a prefix that holds the fixed part and, usually, the whole header; a header longer than that
    (explicit positions of a long segment) takes a second copy of exactly its length. The result may be
    shorter than the header when the blob is; :func:`parse_header` reports that.
    """
    if blob.dtype != torch.uint8 or blob.dim() != 1:
        raise ValueError(f"blob must be a 1-D uint8 tensor, got {blob.dtype} with shape {list(blob.shape)}")
    head = blob[:_HEAD_PREFIX].cpu().numpy().tobytes()
    if len(head) < _FIXED.size:
        return head
    magic, _, flags, *_, num_t, _, n_chunks = _FIXED.unpack_from(head)
    need = header_nbytes(num_t, n_chunks, bool(flags & FLAG_EXPLICIT_POSITIONS))
    if magic == MAGIC and need > len(head) and blob.numel() > len(head):
        head = blob[:need].cpu().numpy().tobytes()
    return head


def parse_header(head: bytes, expect_artifact_id: bytes, blob_nbytes: int | None = None) -> BlobHeader:
    """Validate and parse; raises a :class:`~kvtc_sglang.codec.errors.BlobError` subclass on any defect.

    Args:
        head: the blob, or at least its first ``min(blob_nbytes, header length)`` bytes (:func:`header_bytes`).
        expect_artifact_id: the decoder's calibration fingerprint.
        blob_nbytes: the whole blob's length; default ``len(head)``.
    """
    total_in = len(head) if blob_nbytes is None else blob_nbytes
    if total_in < _FIXED.size:
        raise BlobTruncatedError(f"blob has {total_in} bytes, the fixed header alone needs {_FIXED.size}")
    magic, version, flags, crc, art_id, num_l, num_h, num_d, dcode, _, num_t, start, n_chunks = _FIXED.unpack_from(head)
    if magic != MAGIC:
        raise BlobVersionError(f"not a KVTC blob: magic {magic!r}, expected {MAGIC!r}")
    if version != BLOB_VERSION:
        raise BlobVersionError(f"blob format version {version}, this decoder reads version {BLOB_VERSION}")
    explicit = bool(flags & FLAG_EXPLICIT_POSITIONS)
    hdr_len = header_nbytes(num_t, n_chunks, explicit)
    if total_in < hdr_len:
        raise BlobTruncatedError(f"blob has {total_in} bytes, its header needs {hdr_len}")
    if len(head) < hdr_len:
        raise ValueError(f"parse_header got {len(head)} bytes of a {hdr_len}-byte header (use header_bytes)")
    if zlib.crc32(head[12:hdr_len]) != crc:
        raise BlobChecksumError("blob header CRC32 mismatch")
    if art_id != expect_artifact_id:
        raise BlobCalibrationMismatchError(
            f"blob was encoded with calibration {art_id.hex()}, decoder holds {expect_artifact_id.hex()}"
        )
    if dcode not in CODE_DTYPES:
        raise BlobVersionError(f"unknown dtype code {dcode} in blob header")
    chunks = tuple(_CHUNK.unpack_from(head, _FIXED.size + i * _CHUNK.size) for i in range(n_chunks))
    if explicit:
        off = _FIXED.size + n_chunks * _CHUNK.size
        positions = torch.frombuffer(bytearray(head[off : off + 4 * num_t]), dtype=torch.int32).to(torch.int64)
    else:
        positions = torch.arange(start, start + num_t, dtype=torch.int64)
    total = hdr_len + sum(c[0] for c in chunks)
    if total_in != total:
        raise BlobTruncatedError(f"blob has {total_in} bytes, header and chunk table say {total}")
    return BlobHeader(art_id, num_l, num_h, num_d, CODE_DTYPES[dcode], positions, chunks, hdr_len)


def verify_chunks(blob: torch.Tensor, header: BlobHeader) -> list[tuple[int, int]]:
    """Check each chunk's CRC32 where ``blob [n] uint8`` lives; returns ``(offset, length)`` of every chunk.

    On a GPU the CRCs are computed there (:func:`~.crc.crc32_many`); only the ``[num_chunks]`` CRC values
    come to the host, not the blob.
    """
    return verify_chunks_many([blob], [header])[0]


def verify_chunks_many(blobs: list[torch.Tensor], headers: list[BlobHeader]) -> list[list[tuple[int, int]]]:
    """:func:`verify_chunks` for several blobs with one :func:`~.crc.crc32_many` call (one copy of CRC values
    to the host for all of them). A mismatch raises ``BlobChecksumError`` marked with the blob's index."""
    spans: list[list[tuple[int, int]]] = []
    for header in headers:
        off, own = header.data_offset, []
        for clen, _, _ in header.chunks:
            own.append((off, clen))
            off += clen
        spans.append(own)
    got = iter(crc32_many([b[o : o + n] for b, own in zip(blobs, spans, strict=True) for o, n in own]))
    for index, header in enumerate(headers):
        for i, (_, _, crc) in enumerate(header.chunks):
            actual = next(got)
            if actual != crc:
                raise BlobChecksumError(
                    f"chunk {i} CRC32 mismatch: table says {crc:#010x}, bytes give {actual:#010x}"
                ).at(index)
    return spans


def checked_header(
    blob: torch.Tensor | bytes, artifact_id: bytes, shape: tuple[int, int, int], owner: str
) -> BlobHeader:
    """A blob's header (copies only the header) checked against ``artifact_id`` and the codec's ``(L, H, D)``;
    ``owner`` names what the codec's geometry comes from in the error (``calibration``, ``codec``)."""
    if isinstance(blob, (bytes, bytearray)):
        header = parse_header(bytes(blob), artifact_id)
    else:
        header = parse_header(header_bytes(blob), artifact_id, blob.numel())
    got = (header.num_layers, header.num_heads, header.head_dim)
    if got != shape:
        raise BlobCalibrationMismatchError(
            f"blob shape L,H,D = {','.join(map(str, got))}, {owner} has {','.join(map(str, shape))}"
        )
    return header


def headers_of(read: Callable[[torch.Tensor], BlobHeader], blobs: list[torch.Tensor]) -> list[BlobHeader]:
    """``read`` of every blob; a ``BlobError`` names the blob's index."""
    out = []
    for i, blob in enumerate(blobs):
        try:
            out.append(read(blob))
        except BlobError as e:
            raise e.at(i) from None
    return out
