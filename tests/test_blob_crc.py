"""Blob integrity checked where the blob lives: only the header is read on the host, chunk CRCs use crc32_many.

The device path (torch CRC) is forced on CPU tensors here, so it is exercised without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from kvtc_sglang.codec import BlobChecksumError, BlobTruncatedError
from kvtc_sglang.codec import blob as blob_mod
from kvtc_sglang.codec import crc as crc_mod
from kvtc_sglang.codec import framing as framing_mod
from kvtc_sglang.codec.blob import build_header, header_bytes, parse_header

ARTIFACT_ID = b"12345678"


def _force_torch_crc(monkeypatch) -> list[int]:
    """Route the blob layer's CRCs through the torch path (as on a GPU); returns the batch sizes seen."""
    calls: list[int] = []

    def forced(chunks, method="auto"):
        calls.append(len(chunks))
        return crc_mod.crc32_many(chunks, "torch")

    monkeypatch.setattr(blob_mod, "crc32_many", forced)
    monkeypatch.setattr(framing_mod, "crc32_many", forced)
    return calls


def _kv(codec, num_tokens: int, seed: int):
    s = codec.spec
    g = torch.Generator().manual_seed(seed)
    shape = (s.num_layers, num_tokens, s.num_kv_heads, s.head_dim)
    k = torch.randn(shape, generator=g).to(torch.bfloat16)
    v = torch.randn(shape, generator=g).to(torch.bfloat16)
    return k, v, torch.arange(7, 7 + num_tokens)


def test_torch_crc_writes_the_same_blob_and_decodes_it(codec, monkeypatch):
    k, v, pos = _kv(codec, 300, 0)
    ref_blob = codec.encode(k, v, pos)
    ref = codec.decode(ref_blob)
    calls = _force_torch_crc(monkeypatch)
    blob = codec.encode(k, v, pos)
    assert torch.equal(blob, ref_blob)
    got = codec.decode(blob)
    assert all(torch.equal(a, b) for a, b in zip(got, ref, strict=True))
    n_chunks = len(codec.read_header(blob).chunks)
    assert calls == [n_chunks, n_chunks]  # one batched CRC call per encode and per decode


def test_torch_crc_catches_chunk_corruption(codec, monkeypatch):
    k, v, pos = _kv(codec, 300, 1)
    blob = codec.encode(k, v, pos)
    header = codec.read_header(blob)
    _force_torch_crc(monkeypatch)
    n = len(header.chunks)
    assert n >= 3, n
    last = header.data_offset + sum(c[0] for c in header.chunks[:-1])  # first byte of the last chunk
    for at, chunk in ((header.data_offset, 0), (header.data_offset + header.chunks[0][0] + 3, 1), (last, n - 1)):
        bad = blob.clone()
        bad[at] ^= 0x10
        with pytest.raises(BlobChecksumError, match=f"chunk {chunk} CRC32 mismatch"):
            codec.decode(bad)


def test_encode_many_segments_is_one_crc_batch(codec, monkeypatch):
    s = codec.spec
    g = torch.Generator().manual_seed(2)
    shape = (64, s.num_kv_heads, s.head_dim)
    pool = [torch.randn(shape, generator=g).to(torch.bfloat16) for _ in range(2 * s.num_layers)]
    k_layers, v_layers = pool[: s.num_layers], pool[s.num_layers :]
    segments = [(torch.arange(0, 20), torch.arange(20)), (torch.arange(30, 61), torch.arange(100, 131))]
    ref = codec.encode_rows_many(k_layers, v_layers, segments)
    calls = _force_torch_crc(monkeypatch)
    blobs = codec.encode_rows_many(k_layers, v_layers, segments)
    assert all(torch.equal(a, b) for a, b in zip(blobs, ref, strict=True))
    assert len(calls) == 1


def test_header_bytes_copies_the_header_not_the_chunks():
    positions = torch.arange(2000, dtype=torch.int64) * 3  # explicit positions: an 8 KB header
    body = torch.randint(0, 256, (9000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    chunks = [(4000, 60000, 1), (5000, 70000, 2)]
    head = build_header(ARTIFACT_ID, (2, 3, 64), torch.bfloat16, positions, chunks)
    blob = torch.cat([torch.frombuffer(bytearray(head), dtype=torch.uint8), body])
    got = header_bytes(blob)
    assert got == head  # exactly the header, in a second copy after the 4 KiB prefix
    parsed = parse_header(got, ARTIFACT_ID, blob.numel())
    assert torch.equal(parsed.positions, positions) and parsed.chunks == tuple(chunks)
    short = build_header(ARTIFACT_ID, (2, 3, 64), torch.bfloat16, torch.arange(5, 25), chunks)
    blob = torch.cat([torch.frombuffer(bytearray(short), dtype=torch.uint8), body])
    assert len(header_bytes(blob)) == 4096 < blob.numel()  # the prefix only
    with pytest.raises(BlobTruncatedError, match="header and chunk table say"):
        parse_header(header_bytes(blob[:-1]), ARTIFACT_ID, blob.numel() - 1)
