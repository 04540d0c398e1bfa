"""Quantization and bit-packing: integer and bitstream paths compared exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import MIXED

from kvtc_sglang.codec.allocation import Allocation, Group
from kvtc_sglang.codec.quant import (
    decode_coefficients,
    dequantize_int,
    encode_coefficients,
    pack_codes,
    payload_nbytes,
    quantize_int,
    unpack_codes,
)


def pack_ref(codes: torch.Tensor, bits: int) -> bytes:
    """Reference bit-packer: each row little-endian (code ``i`` at bit ``bits * i``), padded to a byte."""
    out = b""
    for row in codes.tolist():
        acc = 0
        for i, c in enumerate(row):
            acc |= int(c) << (bits * i)
        out += acc.to_bytes((len(row) * bits + 7) // 8, "little")
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("n", [1, 7, 97, 1000, 4099])
def test_pack_matches_reference_and_roundtrips(bits, rows, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (rows, n), dtype=torch.uint8, generator=g)
    packed = pack_codes(codes, bits)
    assert packed.numpy().tobytes() == pack_ref(codes, bits)
    assert torch.equal(unpack_codes(packed, bits, rows, n), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (7, 16), (97, 64), (1000, 3)])
def test_int_quantization_error_is_within_half_a_step(bits, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(bits)) * 10
    codes, lo, step = quantize_int(x, bits)
    assert int(codes.max()) < (1 << bits)
    err = (dequantize_int(codes, lo, step) - x).abs()
    # half a step, plus the fp16 rounding of the minimum and of the step times the largest code
    bound = step.float()[:, None] / 2 + x.abs().amax(1, keepdim=True) * 2e-3 + 1e-3
    assert bool((err <= bound).all())


def test_constant_rows_quantize_exactly_to_fp16():
    x = torch.full((5, 16), 3.25)
    codes, lo, step = quantize_int(x, 2)
    assert torch.equal(dequantize_int(codes, lo, step), x)


def coefficient_roundtrip_ref(coeffs, alloc, fp8_scale):
    """Reference: quantize each coded group and dequantize it directly, zeros for dropped components."""
    out = torch.zeros_like(coeffs)
    for g in alloc.coded_groups():
        seg = coeffs[:, g.start : g.start + g.size]
        if g.kind == "fp8":
            s = fp8_scale[g.start : g.start + g.size]
            out[:, g.start : g.start + g.size] = (seg / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
        else:
            codes, lo, step = quantize_int(seg, int(g.kind[3:]))
            out[:, g.start : g.start + g.size] = dequantize_int(codes, lo, step)
    return out


@pytest.mark.parametrize("num_tokens", [1, 7, 97, 1000])
def test_payload_roundtrip_equals_reference(num_tokens):
    alloc = MIXED
    rank = alloc.rank
    g = torch.Generator().manual_seed(num_tokens)
    coeffs = torch.randn(num_tokens, rank, generator=g) * torch.linspace(30, 0.1, rank)
    fp8_scale = coeffs.abs().amax(0) * 2 / 448 + 1e-6
    payload = encode_coefficients(coeffs, alloc, fp8_scale)
    assert payload.numel() == payload_nbytes(alloc, num_tokens)
    back = decode_coefficients(payload, alloc, fp8_scale, num_tokens, rank)
    assert torch.equal(back, coefficient_roundtrip_ref(coeffs, alloc, fp8_scale))
    assert torch.equal(back[:, 114], torch.zeros(num_tokens))  # the dropped component


def test_decode_rejects_wrong_payload_size():
    alloc = Allocation((Group(0, 16, "int4"),))
    with pytest.raises(ValueError, match="payload must hold"):
        decode_coefficients(torch.zeros(3, dtype=torch.uint8), alloc, torch.ones(16), 4, 16)


def test_allocation_validation():
    with pytest.raises(ValueError, match="consecutive"):
        Allocation((Group(0, 1, "fp8"), Group(2, 1, "fp8")))
    with pytest.raises(ValueError, match="kind"):
        Group(0, 1, "int3")
    a = Allocation.from_json([[0, 1, "fp8"], [1, 16, "int2"], [17, 64, "drop"]])
    assert a.rank == 17 and a.bits_per_token == 8 + 16 * 2 + 32
    with pytest.raises(ValueError, match="allocation row"):
        Allocation.from_json([[0, "1", "fp8"]])
