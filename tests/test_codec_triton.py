"""The codec's Triton path on the real calibration and real SmolLM2 K/V, against its torch path.

Reference: the torch path (``kernels="torch"``). On CPU the Triton path runs under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import pytest
import torch
from conftest import paged_slots, rel_err

from kvtc_sglang.codec import BlobPositionsError, KVTCCodec
from kvtc_sglang.codec.backend_triton import rope_tables
from kvtc_sglang.triton_kernels import LayerTable, project

NUM_T = 97  # odd on purpose: rows of packed codes end mid-byte


@pytest.fixture(scope="module")
def paths(artifact):
    return KVTCCodec(artifact, kernels="torch"), KVTCCodec(artifact, kernels="triton")


@pytest.fixture(scope="module")
def segment(real_kv):
    k, v, _ = real_kv
    return k[:, 200 : 200 + NUM_T].contiguous(), v[:, 200 : 200 + NUM_T].contiguous(), torch.arange(200, 200 + NUM_T)


def pool_rows(k: torch.Tensor, v: torch.Tensor, rows: int, page: int):
    """A KV pool ``L x [rows, H, D]`` holding ``k``/``v`` ``[L, T, H, D]`` at page-aligned random slots."""
    num_l, num_t = k.shape[:2]
    slots = paged_slots(num_t, page, rows, seed=0)
    g = torch.Generator().manual_seed(1)
    kb = [torch.randn(rows, *k.shape[2:], generator=g).to(k.dtype) for _ in range(num_l)]
    vb = [torch.randn(rows, *k.shape[2:], generator=g).to(k.dtype) for _ in range(num_l)]
    for layer in range(num_l):
        kb[layer][slots] = k[layer]
        vb[layer][slots] = v[layer]
    return kb, vb, slots


def test_kernel_coefficients_quantize_to_the_same_bytes(paths, segment):
    """The bitstream stage is exact: torch's quantizer on the kernel's coefficients gives the kernel's bytes."""
    torch_codec, triton_codec = paths
    k, v, pos = segment
    blob = triton_codec.encode(k, v, pos)
    payload = triton_codec.payload_of(blob)
    streams = triton_codec._device_streams(k.device)
    sk, sv = streams.keys, streams.values
    rope = rope_tables(triton_codec.spec.ropes, pos, k.device)
    ck = project(LayerTable(list(k.unbind(0)), 3, 64), torch.arange(NUM_T), sk.mean, sk.enc_basis, rope)
    cv = project(LayerTable(list(v.unbind(0)), 3, 64), torch.arange(NUM_T), sv.mean, sv.enc_basis, None)
    assert torch.equal(payload, torch_codec.quantize(ck, cv))
    # End to end the paths differ only where a coefficient sits within float rounding of a code boundary.
    ref = torch_codec.quantize(*torch_codec.transform(k, v, pos))
    assert payload.numel() == ref.numel()
    assert int((payload != ref).sum()) <= payload.numel() // 1000


@pytest.mark.parametrize("page", [1, 16])
def test_decode_rows_writes_the_pool_like_the_torch_path(paths, segment, page):
    torch_codec, triton_codec = paths
    k, v, pos = segment
    blob = torch_codec.encode(k, v, pos)
    kb, vb, slots = pool_rows(k, v, 160, page)
    kt, vt = [b.clone() for b in kb], [b.clone() for b in vb]
    torch_codec.decode_rows(blob, kb, vb, slots, pos)
    triton_codec.decode_rows(blob, kt, vt, slots, pos)
    rest = torch.ones(160, dtype=torch.bool)
    rest[slots] = False
    for a, b in zip(kt + vt, kb + vb, strict=True):
        assert torch.equal(a[rest], b[rest])
        scale = float(b[slots].float().abs().max())
        torch.testing.assert_close(a[slots].float(), b[slots].float(), atol=2.0**-7 * scale, rtol=0)  # bf16 ulp


def test_encode_rows_reads_the_pool_in_place(paths, segment):
    torch_codec, triton_codec = paths
    k, v, pos = segment
    kb, vb, slots = pool_rows(k, v, 200, 16)
    assert torch.equal(torch_codec.encode_rows(kb, vb, slots, pos), torch_codec.encode(k, v, pos))
    blob = triton_codec.encode_rows(kb, vb, slots, pos)
    k2, v2, _ = torch_codec.decode(blob)  # a Triton blob is an ordinary blob
    k3, v3, _ = torch_codec.decode(torch_codec.encode(k, v, pos))
    for a, b in ((k2, k3), (v2, v3)):
        assert rel_err(a, b) < 0.01  # the same reconstruction but for a few boundary codes


def test_decode_rows_checks_everything_before_writing(paths, segment):
    torch_codec, triton_codec = paths
    k, v, pos = segment
    blob = torch_codec.encode(k, v, pos)
    kb, vb, slots = pool_rows(k, v, 160, 1)
    before = [b.clone() for b in kb + vb]
    for codec in paths:
        with pytest.raises(BlobPositionsError, match="positions"):
            codec.decode_rows(blob, kb, vb, slots, pos + 1)
        with pytest.raises(ValueError, match=r"blob holds 97 tokens, destination is 96 rows"):
            codec.decode_rows(blob, kb, vb, slots[:-1], pos)
    assert all(torch.equal(a, b) for a, b in zip(kb + vb, before, strict=True))
