"""Codec round trips on real SmolLM2 K/V, determinism, ratio, and every blob defect raising clearly."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch
from conftest import rel_err

from kvtc_sglang.codec import (
    BlobCalibrationMismatchError,
    BlobChecksumError,
    BlobError,
    BlobTruncatedError,
    BlobVersionError,
    KVTCCodec,
    ZlibDeflate,
)
from kvtc_sglang.codec.blob import BLOB_VERSION


def reconstruct_ref(codec: KVTCCodec, k, v, positions):
    """Reference: transform, quantize, dequantize, inverse transform, with no blob and no DEFLATE."""
    ck, cv = codec.transform(k, v, positions)
    ck2, cv2 = codec.dequantize(codec.quantize(ck, cv), k.shape[1])
    return codec.inverse_transform(ck2, cv2, positions, k.dtype)


def test_roundtrip_matches_reference_and_is_accurate(codec, real_kv):
    k, v, pos = real_kv
    blob = codec.encode(k, v, pos)
    k2, v2, pos2 = codec.decode(blob)
    kr, vr = reconstruct_ref(codec, k, v, pos)
    assert torch.equal(k2, kr) and torch.equal(v2, vr)
    assert torch.equal(pos2, pos)
    assert k2.dtype == k.dtype and k2.shape == k.shape
    # a real, small calibration at 16x: the reconstruction is close but not exact
    assert 0.0 < rel_err(k2, k) < 0.25
    assert 0.0 < rel_err(v2, v) < 0.6


def test_ratio_at_default_setting_is_at_least_16x(codec, real_kv):
    k, v, pos = real_kv
    raw_bytes = 2 * k.numel() * 2  # K and V in 16-bit
    blob = codec.encode(k, v, pos)
    assert raw_bytes / codec.payload_nbytes(k.shape[1]) >= 16.0
    assert raw_bytes / blob.numel() >= 16.0
    assert blob.numel() <= codec.max_blob_nbytes(k.shape[1])


def test_encode_and_decode_are_deterministic(codec, real_kv):
    k, v, pos = real_kv
    b1, b2 = codec.encode(k, v, pos), codec.encode(k.clone(), v.clone(), pos.clone())
    assert torch.equal(b1, b2)
    d1, d2 = codec.decode(b1), codec.decode(b1.clone())
    assert all(torch.equal(x, y) for x, y in zip(d1, d2, strict=True))


@pytest.mark.parametrize("num_tokens", [1, 7, 97])
def test_odd_sizes_and_explicit_positions(codec, real_kv, num_tokens):
    k, v, _ = real_kv
    pos = torch.randperm(5000, generator=torch.Generator().manual_seed(num_tokens))[:num_tokens].sort().values + 3
    blob = codec.encode(k[:, :num_tokens], v[:, :num_tokens], pos)
    k2, v2, pos2 = codec.decode(bytes(blob.numpy().tobytes()))
    assert torch.equal(pos2, pos)
    kr, vr = reconstruct_ref(codec, k[:, :num_tokens], v[:, :num_tokens], pos)
    assert torch.equal(k2, kr) and torch.equal(v2, vr)


def test_chunking_splits_payload_and_still_decodes(artifact, real_kv):
    k, v, pos = real_kv
    small = KVTCCodec(artifact, entropy=ZlibDeflate(level=1), chunk_bytes=4096)
    blob = small.encode(k, v, pos)
    header = small.read_header(blob)
    assert len(header.chunks) == -(-small.payload_nbytes(600) // 4096)
    k2, _, _ = small.decode(blob)
    assert torch.equal(k2, reconstruct_ref(small, k, v, pos)[0])


def test_huffman_only_default_strategy_is_plain_deflate_and_as_small(codec, real_kv):
    """The default ``ZlibDeflate`` skips LZ77 (``Z_HUFFMAN_ONLY``): the same payload inflates bit for bit through
    plain zlib, and on real coefficients it is at most 2% larger than zlib's default strategy."""
    k, v, pos = real_kv
    payload = codec.quantize(*codec.transform(k, v, pos))  # [payload_nbytes(T)] uint8
    chunks = list(torch.split(payload, 1 << 16))
    huff, full = ZlibDeflate().compress(chunks), ZlibDeflate(strategy="default").compress(chunks)
    assert ZlibDeflate().strategy == "huffman"
    for c, h, f in zip(chunks, huff, full, strict=True):
        assert zlib.decompress(h.numpy().tobytes(), wbits=-15) == c.numpy().tobytes()
        assert zlib.decompress(f.numpy().tobytes(), wbits=-15) == c.numpy().tobytes()
    n_huff, n_full = sum(h.numel() for h in huff), sum(f.numel() for f in full)
    assert n_huff < payload.numel() and n_huff <= 1.02 * n_full
    with pytest.raises(ValueError, match=r"strategy must be one of \('huffman', 'default'\), got 'lz4'"):
        ZlibDeflate(strategy="lz4")


def test_raw_deflate_stream_is_plain_zlib_wbits_minus_15(codec, real_kv):
    k, v, pos = real_kv
    blob = codec.encode(k[:, :50], v[:, :50], pos[:50]).numpy().tobytes()
    header = codec.read_header(blob)
    clen, rlen, _ = header.chunks[0]
    raw = zlib.decompress(blob[header.data_offset : header.data_offset + clen], wbits=-15)
    assert len(raw) == rlen


def test_input_errors_name_the_problem(codec, real_kv):
    k, v, pos = real_kv
    with pytest.raises(ValueError, match=r"\[L, T, H, D\]"):
        codec.encode(k[:, :, :2], v, pos)
    with pytest.raises(ValueError, match="positions must be"):
        codec.encode(k, v, pos[:10])
    with pytest.raises(ValueError, match="integer"):
        codec.encode(k, v, pos.float())
    with pytest.raises(ValueError, match="k and v must match"):
        codec.encode(k, v.float(), pos)


@pytest.fixture(scope="module")
def small_blob(codec, real_kv) -> bytes:
    k, v, pos = real_kv
    return codec.encode(k[:, :40], v[:, :40], pos[:40]).numpy().tobytes()


@pytest.mark.parametrize("cut", [0, 10, 39, 41, 60, -1, -100])
def test_truncated_blob_raises(codec, small_blob, cut):
    with pytest.raises(BlobTruncatedError):
        codec.decode(small_blob[:cut])


def test_trailing_bytes_raise(codec, small_blob):
    with pytest.raises(BlobTruncatedError):
        codec.decode(small_blob + b"\0")


def test_every_single_bit_flip_is_detected(codec, small_blob):
    """Flip one bit at a time across the whole blob: each must raise a BlobError, never decode."""
    step = max(1, len(small_blob) * 8 // 1500)
    for bit in range(0, len(small_blob) * 8, step):
        bad = bytearray(small_blob)
        bad[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(BlobError):
            codec.decode(bytes(bad))


def test_chunk_corruption_is_a_checksum_error(codec, small_blob):
    header = codec.read_header(small_blob)
    bad = bytearray(small_blob)
    bad[header.data_offset + 5] ^= 0xFF
    with pytest.raises(BlobChecksumError, match="chunk 0"):
        codec.decode(bytes(bad))


def test_newer_version_and_foreign_bytes_are_refused(codec, small_blob):
    newer = bytearray(small_blob)
    newer[4:6] = struct.pack("<H", BLOB_VERSION + 1)
    with pytest.raises(BlobVersionError, match=f"version {BLOB_VERSION + 1}"):
        codec.decode(bytes(newer))
    with pytest.raises(BlobVersionError, match="not a KVTC blob"):
        codec.decode(b"GZIP" + small_blob[4:])


def test_blob_from_another_calibration_is_refused(artifact, small_blob):
    import dataclasses

    other_keys = dataclasses.replace(artifact.keys, mean=artifact.keys.mean + 1.0)
    other = KVTCCodec(dataclasses.replace(artifact, keys=other_keys))
    with pytest.raises(BlobCalibrationMismatchError, match="calibration"):
        other.decode(small_blob)


def test_encode_rows_many_batches_the_entropy_stage_and_equals_one_by_one(codec, real_kv):
    """Several nodes of one pool in one call (one batched DEFLATE call): the same blobs as one at a time."""
    k, v, _ = real_kv
    k_layers, v_layers = list(k.unbind(0)), list(v.unbind(0))  # L x [600, H, D], like a pool's buffers
    segments = [(torch.arange(10, 60), torch.arange(10, 60)), (torch.tensor([300, 7, 450]), torch.arange(3) + 99)]
    blobs = codec.encode_rows_many(k_layers, v_layers, segments)
    assert len(blobs) == 2
    for blob, (slots, pos) in zip(blobs, segments, strict=True):
        assert torch.equal(blob, codec.encode_rows(k_layers, v_layers, slots, pos))
        assert torch.equal(blob, codec.encode(k[:, slots], v[:, slots], pos))
    assert codec.encode_rows_many(k_layers, v_layers, []) == []
