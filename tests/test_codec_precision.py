"""The torch backend's bf16 projections (``dot_precision="bf16"``, what the CPU server uses where the CPU has
native bf16 GEMMs) against the exact fp32 path: same blob format, the same accuracy to within a few percent
of the codec's own error, and clear refusals of precisions a backend does not have."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from kvtc_sglang.cache.config import KVTCCacheConfig, resolve_dot_precision
from kvtc_sglang.codec import KVTCCodec
from kvtc_sglang.codec.backend import DeviceStreams, TorchBackend
from kvtc_sglang.codec.rope import remove_rope


def project_ref(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Reference bf16 projection: ``x [T, F]`` and ``basis [F, R]`` rounded to bf16, product in fp64."""
    return (x.to(torch.bfloat16).double() @ basis.to(torch.bfloat16).double()).float()


@pytest.fixture(scope="module")
def bf16_codec(artifact) -> KVTCCodec:
    return KVTCCodec(artifact, dot_precision="bf16")


@pytest.mark.parametrize("num_tokens", [1, 7, 97, 600])
def test_bf16_coefficients_match_the_bf16_reference_and_stay_near_fp32(artifact, real_kv, num_tokens):
    k, v = (t[:, :num_tokens].contiguous() for t in real_kv[:2])  # [L, T, H, D] bf16
    pos = real_kv[2][:num_tokens]
    streams = DeviceStreams.build(artifact, torch.device("cpu"))
    exact = TorchBackend(artifact.spec, streams).transform(k, v, pos)  # [T, R_k], [T, R_v] fp32
    low = TorchBackend(artifact.spec, streams, "bf16").transform(k, v, pos)
    xk = remove_rope(k, pos, artifact.spec.ropes).permute(1, 0, 2, 3).reshape(num_tokens, -1)  # [T, F]
    ref_k = project_ref(xk - streams.keys.mean, streams.keys.enc_basis)
    assert rel_err(low[0], ref_k) < 2e-3  # fp32 accumulation inside the GEMM, output rounded to bf16
    for a, b in zip(low, exact, strict=True):
        assert a.dtype == torch.float32 and a.shape == b.shape
        assert 0.0 < rel_err(a, b) < 1e-2  # bf16 rounding of inputs: ~3e-3


def test_bf16_blobs_have_the_same_format_and_decode_either_way(codec, bf16_codec, real_kv):
    k, v, pos = real_kv
    exact_blob, low_blob = codec.encode(k, v, pos), bf16_codec.encode(k, v, pos)
    assert codec.read_header(low_blob).num_tokens == k.shape[1]
    assert bf16_codec.payload_nbytes(k.shape[1]) == codec.payload_nbytes(k.shape[1])
    ke, ve, _ = codec.decode(exact_blob)
    for blob in (exact_blob, low_blob):
        for dec in (codec, bf16_codec):
            k2, v2, pos2 = dec.decode(blob)
            assert torch.equal(pos2, pos) and k2.dtype == k.dtype
            # within a few percent of the exact codec's own error, whichever path encoded and decoded
            assert rel_err(k2, k) < 1.05 * rel_err(ke, k) and rel_err(v2, v) < 1.05 * rel_err(ve, v)


def test_bf16_rows_round_trip_through_pool_buffers(bf16_codec, codec, real_kv):
    k, v, pos = real_kv
    n, rows = 97, 300
    slots = torch.randperm(rows)[:n]
    kb = [torch.zeros(rows, *k.shape[2:], dtype=k.dtype) for _ in range(k.shape[0])]
    vb = [torch.zeros_like(b) for b in kb]
    for layer in range(k.shape[0]):
        kb[layer][slots] = k[layer, :n]
        vb[layer][slots] = v[layer, :n]
    blob = bf16_codec.encode_rows(kb, vb, slots, pos[:n])
    out_k = [torch.zeros_like(b) for b in kb]
    out_v = [torch.zeros_like(b) for b in vb]
    bf16_codec.decode_rows(blob, out_k, out_v, slots, pos[:n])
    k2 = torch.stack([b[slots] for b in out_k])  # [L, T, H, D]
    ke, _, _ = codec.decode(codec.encode(k[:, :n].contiguous(), v[:, :n].contiguous(), pos[:n]))
    assert rel_err(k2, k[:, :n]) < 1.05 * rel_err(ke, k[:, :n])


def test_a_precision_the_backend_lacks_is_refused_by_name(artifact):
    with pytest.raises(ValueError, match="torch backend's dot_precision.*'tf32'"):
        KVTCCodec(artifact, kernels="torch", dot_precision="tf32")
    with pytest.raises(ValueError, match="dot_precision must be one of .*'fp16'"):
        KVTCCodec(artifact, dot_precision="fp16")
    with pytest.raises(ValueError, match="dot_precision must be one of .*'bf16'"):
        KVTCCodec(artifact, kernels="triton", dot_precision="bf16")
    auto_tf32 = KVTCCodec(artifact, dot_precision="tf32")  # Triton's: refused when a CPU backend is made
    with pytest.raises(ValueError, match="torch backend's dot_precision"):
        auto_tf32.payload_backend(torch.device("cpu"))


def test_the_cache_option_resolves_per_device_and_refuses_unknown_values():
    assert resolve_dot_precision("auto", "cpu", cpu_has_bf16=True) == "bf16"
    assert resolve_dot_precision("auto", "cpu", cpu_has_bf16=False) == "ieee"
    assert resolve_dot_precision("auto", "gpu", cpu_has_bf16=True) == "ieee"
    assert resolve_dot_precision("ieee", "cpu", cpu_has_bf16=True) == "ieee"
    assert KVTCCacheConfig(calibration="a").dot_precision == "auto"
    with pytest.raises(ValueError, match="dot_precision must be one of .*'fp8'"):
        KVTCCacheConfig(calibration="a", dot_precision="fp8")


def test_chunks_cover_the_tokens_in_near_equal_parts():
    from kvtc_sglang.codec.backend import chunks

    assert chunks(0) == [] and chunks(1) == [(0, 1)] and chunks(512) == [(0, 512)]
    assert chunks(513) == [(0, 257), (257, 513)]
    assert chunks(1100, 512) == [(0, 367), (367, 734), (734, 1100)]
    for n in (1, 7, 97, 511, 1000, 4097):
        parts = chunks(n)
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))  # contiguous
        sizes = [hi - lo for lo, hi in parts]
        assert max(sizes) <= 512 and max(sizes) - min(sizes) < len(parts)  # no short tail


# the GEMM's rounding may differ with the number of rows: fp32 ~1e-7 relative, a bf16 product one bf16 step
COEFF_TOL = {"ieee": {"rtol": 1e-5, "atol": 1e-5}, "bf16": {"rtol": 2**-7, "atol": 1e-3}}


@pytest.mark.parametrize("precision", ["ieee", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 7, 513, 1024])
def test_chunked_transform_matches_one_pass(artifact, kv_bank, precision, num_tokens):
    """The torch backend transforms at most ``CHUNK_TOKENS`` tokens at a time (encode and decode, from tensors
    and from pool rows): one pass's coefficients up to the GEMM's rounding, and restored rows within one bf16
    step of one pass's (an fp32 difference may round a code the other way: far below the codec's own error)."""
    from kvtc_sglang.codec.backend import CHUNK_TOKENS

    assert CHUNK_TOKENS < 513  # the two larger sizes cross chunk boundaries
    k, v = (t[:, :num_tokens].contiguous() for t in kv_bank[:2])  # [L, T, H, D] bf16
    pos = torch.arange(num_tokens)  # the bank's own positions
    backend = TorchBackend(artifact.spec, DeviceStreams.build(artifact, torch.device("cpu")), precision)
    ref = backend.transform(k, v, pos)  # [T, R_k], [T, R_v]: every token in one pass
    chunked = backend._coefficients(num_tokens, lambda lo, hi: (k[:, lo:hi], v[:, lo:hi]), pos)
    for a, b in zip(chunked, ref, strict=True):
        # a GEMM's absolute rounding follows the size of the terms it sums, not of the result: at least 1e-6 of the
        # stream's largest coefficient, ~8 fp32 ulps of it (an Intel Xeon's fp32 GEMM differed by up to 6.9e-5
        # on coefficients up to 216: 8 of 1.16M over the flat 1e-5; an AMD EPYC's stayed under it)
        tol = COEFF_TOL[precision]
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=max(tol["atol"], 1e-6 * float(b.abs().max())))
    payload = backend.encode(k, v, pos)
    slots = torch.randperm(num_tokens + 9)[:num_tokens]  # scattered pool rows
    pool_k = [torch.zeros(num_tokens + 9, *k.shape[2:], dtype=k.dtype) for _ in range(k.shape[0])]
    pool_v = [torch.zeros_like(b) for b in pool_k]
    for layer in range(k.shape[0]):
        pool_k[layer][slots], pool_v[layer][slots] = k[layer], v[layer]
    assert torch.equal(backend.encode_rows(pool_k, pool_v, slots, pos), payload)  # the same chunks: same bytes
    ref_k, ref_v = backend.inverse_transform(*backend.dequantize(payload, num_tokens), pos, k.dtype)  # one pass
    dec_k, dec_v = backend.decode(payload, pos, k.dtype)  # [L, T, H, D]
    backend.decode_rows(payload, pool_k, pool_v, slots, pos)
    rows_k, rows_v = torch.stack([b[slots] for b in pool_k]), torch.stack([b[slots] for b in pool_v])
    for got, want in ((dec_k, ref_k), (dec_v, ref_v), (rows_k, ref_k), (rows_v, ref_v)):
        torch.testing.assert_close(got.float(), want.float(), rtol=2**-7, atol=1e-2)
    assert torch.equal(rows_k, dec_k) and torch.equal(rows_v, dec_v)  # rows and tensors: the same code path
