"""nvCOMP runs on torch's current CUDA stream (issue 12, defect 8).

The GPU tests round-trip inside a non-default ``torch.cuda.Stream`` (as SGLang's scheduler runs) and
compare with the default-stream result bit for bit. The cache-key test runs anywhere: it stands in a
fake nvCOMP module and stream getter, and checks that one nvCOMP codec is made per (device, stream).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from kvtc_sglang.codec import BlobChecksumError, KVTCCodec, nvcomp_available
from kvtc_sglang.codec import entropy as entropy_mod
from kvtc_sglang.codec.entropy import NvcompDeflate

_GPU_MARKS = (
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (nvCOMP stream binding)"),
    pytest.mark.skipif(not nvcomp_available(), reason="needs nvidia-nvcomp (pip install 'kvtc-sglang[gpu]')"),
)


def needs_gpu(fn):
    """Mark a test as a GPU test, skipped without CUDA or nvCOMP."""
    for mark in _GPU_MARKS:
        fn = mark(fn)
    return fn


class _FakeCodec:
    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


@pytest.fixture
def fake_nvcomp(monkeypatch):
    """A stand-in ``nvidia.nvcomp`` (records Codec kwargs) and a settable current stream per device."""
    nvcomp = types.ModuleType("nvidia.nvcomp")
    nvcomp.Codec = _FakeCodec  # type: ignore[attr-defined]
    nvcomp.BitstreamKind = types.SimpleNamespace(RAW="RAW")  # type: ignore[attr-defined]
    nvidia = types.ModuleType("nvidia")
    nvidia.nvcomp = nvcomp  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    monkeypatch.setitem(sys.modules, "nvidia.nvcomp", nvcomp)
    current = {0: 11, 1: 21}
    monkeypatch.setattr(entropy_mod, "current_stream_handle", lambda index: current[index])
    return current


def test_one_codec_per_device_and_stream(fake_nvcomp):
    coder = NvcompDeflate()
    a = coder.codec_for(torch.device("cuda", 0))
    assert a.kwargs["cuda_stream"] == 11 and a.kwargs["device_id"] == 0
    assert a.kwargs["bitstream_kind"] == "RAW" and a.kwargs["algorithm"] == "Deflate"
    assert coder.codec_for(torch.device("cuda", 0)) is a  # same stream: reused
    fake_nvcomp[0] = 12  # the caller switched streams (torch.cuda.stream(s))
    b = coder.codec_for(torch.device("cuda", 0))
    assert b is not a and b.kwargs["cuda_stream"] == 12
    c = coder.codec_for(torch.device("cuda", 1))
    assert c.kwargs["device_id"] == 1 and c.kwargs["cuda_stream"] == 21
    fake_nvcomp[0] = 11
    assert coder.codec_for(torch.device("cuda", 0)) is a  # back on the first stream: its codec again
    with pytest.raises(ValueError, match="CUDA tensors"):
        coder.codec_for(torch.device("cpu"))


def test_codec_cache_is_bounded(fake_nvcomp):
    coder = NvcompDeflate()
    first = coder.codec_for(torch.device("cuda", 0))
    for handle in range(100, 100 + NvcompDeflate.MAX_CODECS):
        fake_nvcomp[0] = handle
        coder.codec_for(torch.device("cuda", 0))
    assert len(coder._codecs) == NvcompDeflate.MAX_CODECS
    fake_nvcomp[0] = 11
    assert coder.codec_for(torch.device("cuda", 0)) is not first  # the oldest was dropped, a new one made


def _chunks(device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    noisy = torch.randint(0, 16, (70_000,), dtype=torch.uint8, generator=g)  # compressible
    return [c.to(device) for c in (noisy[:65536], noisy[65536:], torch.arange(4000).to(torch.uint8), noisy[:1])]


@needs_gpu
def test_nvcomp_round_trip_on_a_side_stream_matches_default_stream():
    device = torch.device("cuda")
    chunks = _chunks(device)
    sizes = [c.numel() for c in chunks]
    coder = NvcompDeflate()
    ref = coder.compress(chunks)
    ref_raw = coder.decompress(ref, sizes)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        comp = coder.compress(chunks)
        raw = coder.decompress(comp, sizes)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert len(coder._codecs) == 2  # the default stream's codec and the side stream's
    assert all(torch.equal(a, b) for a, b in zip(comp, ref, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(raw, ref_raw, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(raw, chunks, strict=True))


@needs_gpu
def test_codec_encode_decode_on_a_side_stream_matches_default_stream(artifact):
    codec = KVTCCodec(artifact)
    s = codec.spec
    g = torch.Generator().manual_seed(1)
    shape = (s.num_layers, 300, s.num_kv_heads, s.head_dim)
    k = torch.randn(shape, generator=g).to(torch.bfloat16).cuda()
    v = torch.randn(shape, generator=g).to(torch.bfloat16).cuda()
    pos = torch.arange(5, 305, device="cuda")
    ref_blob = codec.encode(k, v, pos)
    ref = codec.decode(ref_blob)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        blob = codec.encode(k, v, pos)
        out = codec.decode(blob)
        bad = blob.clone()
        bad[-1] ^= 0x40  # the device CRC on the side stream must still catch it
        with pytest.raises(BlobChecksumError, match="CRC32 mismatch"):
            codec.decode(bad)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(blob, ref_blob)
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
