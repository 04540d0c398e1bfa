"""Framing of payloads into blobs and back: DEFLATE chunks (one batched entropy call for many blobs), the
header with each chunk's length and CRC32, and the checks a blob must pass before any of it is decoded.

Pure functions over an :class:`~.entropy.EntropyCoder`; the codec supplies its calibration's identity."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .blob import BlobHeader, build_header, verify_chunks_many
from .crc import crc32_many
from .entropy import EntropyCoder
from .errors import BlobChecksumError


def wrap_payloads(
    coder: EntropyCoder,
    payloads: list[torch.Tensor],
    positions: list[torch.Tensor],
    *,
    dtype: torch.dtype,
    chunk_bytes: int,
    artifact_id: bytes,
    shape: tuple[int, int, int],
) -> list[torch.Tensor]:
    """Blobs (``[n_i]`` uint8 on the payloads' device) of raw payloads ``[nbytes_i]`` uint8 of tokens at
    ``positions[i] [T_i]``: each payload split into ``chunk_bytes`` chunks, every chunk of every payload
    DEFLATEd in one ``coder`` call and checked with one CRC batch (only the CRC values go to the host)."""
    chunked = [list(torch.split(p, chunk_bytes)) if p.numel() else [] for p in payloads]
    flat = coder.compress([c for chunks in chunked for c in chunks])
    crcs = crc32_many(flat)
    blobs, at = [], 0
    for payload, chunks, pos in zip(payloads, chunked, positions, strict=True):
        comp = flat[at : at + len(chunks)]
        crc = crcs[at : at + len(chunks)]
        table = [(c.numel(), r.numel(), k) for c, r, k in zip(comp, chunks, crc, strict=True)]
        at += len(chunks)
        header = build_header(artifact_id, shape, dtype, pos, table)
        head = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(payload.device)
        blobs.append(torch.cat([head, *comp]))
    return blobs


def unwrap_payloads(
    coder: EntropyCoder,
    blobs: list[torch.Tensor],
    headers: list[BlobHeader],
    device: torch.device,
    payload_nbytes: Callable[[int], int],
) -> list[torch.Tensor]:
    """Verify blobs whose headers are read (chunk table sizes against ``payload_nbytes(T)``, CRC32s) and
    inflate them with one ``coder`` call: raw payloads ``[payload_nbytes(T_i)]`` uint8 on ``device``.

    Errors are ``BlobError`` subclasses marked with the failing blob's index. Only the CRC values come to
    the host; a blob elsewhere moves to ``device`` after its check."""
    for i, header in enumerate(headers):
        raw_bytes, need = sum(c[1] for c in header.chunks), payload_nbytes(header.num_tokens)
        if raw_bytes != need:
            raise BlobChecksumError(
                f"chunk table holds {raw_bytes} raw bytes, {header.num_tokens} tokens need {need}"
            ).at(i)
    spans = verify_chunks_many(blobs, headers)
    comp, sizes, counts = [], [], []
    for blob, header, own in zip(blobs, headers, spans, strict=True):
        src = blob.to(device)
        comp += [src[off : off + n] for off, n in own]
        sizes += [c[1] for c in header.chunks]
        counts.append(len(own))
    raw = coder.decompress(comp, sizes)
    payloads, at = [], 0
    for n in counts:
        part = raw[at : at + n]
        at += n
        payloads.append(torch.cat(part) if part else torch.empty(0, dtype=torch.uint8, device=device))
    return payloads
