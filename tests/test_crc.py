"""CRC-32 on the tensors' device (codec/crc.py): bit-identical to zlib.crc32, torch path forced on the CPU."""

from __future__ import annotations

import zlib

import pytest
import torch

from kvtc_sglang.codec.crc import crc32, crc32_many, raw_crc_torch, shift, zeros_crc

SIZES = [0, 1, 2, 3, 4, 7, 15, 16, 17, 97, 255, 256, 1000, 4095, 4096, 4097, 65536, 65537]


def _random(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _zlib(chunks: list[torch.Tensor]) -> list[int]:
    return [zlib.crc32(c.numpy().tobytes()) for c in chunks]


@pytest.mark.parametrize("method", ["torch", "zlib", "auto"])
def test_odd_sizes_match_zlib(method):
    chunks = [_random(n, seed) for seed, n in enumerate(SIZES)]
    assert crc32_many(chunks, method) == _zlib(chunks)


def test_torch_path_several_megabytes():
    chunks = [_random(3_000_001, 1), _random(1 << 21, 2), _random(5, 3), _random(0, 4)]
    assert crc32_many(chunks, "torch") == _zlib(chunks)


def test_torch_path_each_size_alone_and_special_bytes():
    for n in SIZES[:12]:
        c = _random(n, 100 + n)
        assert crc32(c, "torch") == zlib.crc32(c.numpy().tobytes()), n
    for fill in (0, 0xFF):
        c = torch.full((1234,), fill, dtype=torch.uint8)
        assert crc32(c, "torch") == zlib.crc32(bytes([fill]) * 1234)


def test_non_contiguous_and_sliced_views():
    base = _random(10_000, 7)
    views = [base[3:1003], base[1:9999:3], base[5000:], base[0:0]]
    assert crc32_many(views, "torch") == [zlib.crc32(v.contiguous().numpy().tobytes()) for v in views]


def test_single_bit_flip_changes_crc():
    c = _random(4097, 9)
    before = crc32(c, "torch")
    for i in (0, 1, 2048, 4096):
        d = c.clone()
        d[i] ^= 1
        assert crc32(d, "torch") != before
        assert crc32(d, "torch") == zlib.crc32(d.numpy().tobytes())


def test_raw_crc_is_int32_on_the_chunks_device():
    raw = raw_crc_torch([_random(100, 1), _random(33, 2)])
    assert raw.dtype == torch.int32 and raw.shape == (2,) and raw.device.type == "cpu"


def test_length_term_and_shift():
    for n in (0, 1, 5, 16, 1000, 65536):
        assert zeros_crc(n) == zlib.crc32(bytes(n))
    # R(a || b) = shift(R(a), len(b)) ^ R(b), R = zlib CRC without the length term
    a, b = _random(37, 1), _random(501, 2)
    raw_a = zlib.crc32(a.numpy().tobytes()) ^ zeros_crc(37)
    raw_b = zlib.crc32(b.numpy().tobytes()) ^ zeros_crc(501)
    whole = zlib.crc32(torch.cat([a, b]).numpy().tobytes()) ^ zeros_crc(538)
    assert shift(raw_a, 501) ^ raw_b == whole


def test_refuses_bad_inputs():
    with pytest.raises(ValueError, match="method"):
        crc32_many([_random(4, 0)], "crc")
    with pytest.raises(ValueError, match="uint8"):
        crc32_many([torch.zeros(4, dtype=torch.int32)])
    with pytest.raises(ValueError, match="1-D"):
        crc32_many([torch.zeros(2, 2, dtype=torch.uint8)])
    assert crc32_many([]) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the torch CRC on its intended device)")
def test_cuda_matches_zlib():
    chunks = [_random(n, seed) for seed, n in enumerate(SIZES)] + [_random(3_000_001, 99)]
    assert crc32_many([c.cuda() for c in chunks]) == _zlib(chunks)
