"""Triton kernels against their plain-torch references (compiled on CUDA, else under TRITON_INTERPRET=1).

Integer and bitstream outputs are compared with ``torch.equal``; floats within per-dtype tolerances:
fp32 coefficients to 1e-5 of their scale (only the summation order differs), K/V written into the pool
to one unit in the last place of the pool dtype (fp16 2**-10, bf16 2**-7, relative) after the fp32 math.
"""

from __future__ import annotations

import pytest
import torch
from conftest import MIXED, paged_slots

from kvtc_sglang.codec.allocation import Allocation, Group
from kvtc_sglang.codec.backend_triton import rope_tables
from kvtc_sglang.codec.quant import decode_coefficients, encode_coefficients
from kvtc_sglang.codec.rope import RopeConfig
from kvtc_sglang.triton_kernels import (
    LayerTable,
    StreamPlan,
    decode_into,
    decode_into_ref,
    dequant_ref,
    project,
    project_ref,
    quant_pack,
    quant_pack_ref,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-20}
def plan_of(alloc: Allocation) -> StreamPlan:
    return StreamPlan.build(alloc.coded_groups(), alloc.rank, DEVICE)


def tables(rope, pos):
    """The kernels' RoPE tables (``None`` for values), as the codec's Triton backend builds them."""
    return None if rope is None else rope_tables(rope, pos, DEVICE)


def small_stream(num_features: int, alloc: Allocation, seed: int = 0):
    """A synthetic stream (orthonormal basis, mean, fp8 scales): kernel equality needs no real calibration."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(num_features, num_features, generator=g))[0][:, : alloc.rank].contiguous()
    mean = torch.randn(num_features, generator=g) * 0.1
    fp8_scale = torch.rand(alloc.rank, generator=g) + 0.05
    return basis.to(DEVICE), mean.to(DEVICE), fp8_scale.to(DEVICE)


def pool(num_layers: int, rows: int, heads: int, head_dim: int, dtype: torch.dtype, *, seed: int) -> list[torch.Tensor]:
    """Per-layer buffers like SGLang's ``k_buffer``: ``L x [rows, H, D]``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, heads, head_dim, generator=g).to(dtype).to(DEVICE) for _ in range(num_layers)]


def assert_project_matches(bufs, slots, mean, basis, rope, *, pos) -> torch.Tensor:
    """``project`` against ``project_ref`` to 1e-5 of the coefficients' scale; returns the reference."""
    heads, head_dim = bufs[0].shape[1:]
    ref = project_ref(bufs, slots, mean, basis, tables(rope, pos))
    out = project(LayerTable(bufs, heads, head_dim), slots, mean, basis, tables(rope, pos))
    torch.testing.assert_close(out, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
    return ref


@pytest.mark.parametrize("num_tokens", [1, 7, 97, 1031])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "rope",
    [RopeConfig(theta=1e4, rotary_dim=32), RopeConfig(theta=5e5, rotary_dim=32, style="gptj"), None],
    ids=["neox", "gptj", "values"],
)
def test_project_matches_reference(num_tokens, dtype, rope):
    num_l, heads, head_dim = 2, 2, 32
    basis, mean, _ = small_stream(num_l * heads * head_dim, MIXED)
    bufs = pool(num_l, num_tokens + 40, heads, head_dim, dtype, seed=num_tokens)
    slots = paged_slots(num_tokens, 1, num_tokens + 40, seed=1, device=DEVICE)
    pos = torch.arange(3, 3 + num_tokens)
    assert_project_matches(bufs, slots, mean, basis, rope, pos=pos)


def test_project_partial_rotary_and_strided_rows():
    """rotary_dim < D (the rest of each head is unrotated) and pool rows with padding between them."""
    num_l, heads, head_dim, num_t = 3, 2, 64, 50
    basis, mean, _ = small_stream(num_l * heads * head_dim, MIXED, seed=3)
    rope = RopeConfig(theta=1e4, rotary_dim=32)
    wide = pool(num_l, 80, 1, heads * head_dim + 16, torch.float16, seed=5)  # L x [80, 1, 144]
    bufs = [b[:, 0, : heads * head_dim].view(80, heads, head_dim) for b in wide]  # [80, 2, 64], row stride 144
    slots = paged_slots(num_t, 1, 80, seed=2, device=DEVICE)
    pos = torch.arange(1000, 1000 + num_t)
    assert_project_matches(bufs, slots, mean, basis, rope, pos=pos)


def test_per_layer_rope_in_both_kernels():
    """Gemma 3 style RoPE (a base per layer): projection and decode against the torch references."""
    num_l, heads, head_dim, num_t = 3, 1, 64, 41
    ropes = (RopeConfig(theta=1e4, rotary_dim=64), RopeConfig(theta=1e6, rotary_dim=64), RopeConfig(1e4, 64))
    alloc = Allocation((Group(0, 16, "fp8"), Group(16, 64, "int8")))
    basis, mean, fp8_scale = small_stream(num_l * heads * head_dim, alloc, seed=4)
    bufs = pool(num_l, 64, heads, head_dim, torch.bfloat16, seed=8)
    slots = paged_slots(num_t, 1, 64, seed=5, device=DEVICE)
    pos = torch.arange(500, 500 + num_t)
    ref = assert_project_matches(bufs, slots, mean, basis, ropes, pos=pos)
    payload = encode_coefficients(ref, alloc, fp8_scale)
    dec_ref = [torch.zeros_like(b) for b in bufs]
    dec = [torch.zeros_like(b) for b in bufs]
    plan = plan_of(alloc)
    rope = tables(ropes, pos)
    assert rope.cos.shape == (3, num_t, 32)  # one table per layer
    decode_into_ref(payload, plan, fp8_scale, basis.t().contiguous(), mean, rope, dec_ref, slots)
    decode_into(payload, plan, fp8_scale, basis.t().contiguous(), mean, rope, LayerTable(dec, 1, 64), slots)
    with pytest.raises(ValueError, match=r"one RoPE table or one per layer \(3\), got 2"):
        project(LayerTable(bufs, heads, head_dim), slots, mean, basis, tables(ropes[:2], pos))
    for a, b in zip(dec, dec_ref, strict=True):
        scale = float(b.float().abs().max())
        torch.testing.assert_close(a.float(), b.float(), atol=ULP[torch.bfloat16] * scale, rtol=0)


def coefficient_cases(num_tokens: int, alloc: Allocation) -> torch.Tensor:
    """Coefficients ``[T, R]`` with the hard cases: constant rows (step 0), values past the fp8 and fp16
    ranges (row 3), and in row 4 every integer group's values exactly halfway between two codes."""
    g = torch.Generator().manual_seed(num_tokens)
    c = torch.randn(num_tokens, alloc.rank, generator=g) * torch.logspace(1, -2, alloc.rank)[None, :]
    c[0::5] = 0.25  # constant rows: step 0
    if num_tokens > 3:
        c[3, : alloc.rank // 3] = 1e6
    if num_tokens > 4:
        for grp in alloc.coded_groups():
            if grp.kind.startswith("int") and grp.size >= 3:
                levels = (1 << int(grp.kind[3:])) - 1  # min 0, max = levels: step 1.0 exactly
                ties = torch.arange(grp.size - 2) % levels + 0.5
                c[4, grp.start : grp.start + grp.size] = torch.cat([torch.tensor([0.0, levels]), ties])
    return c.to(DEVICE)


@pytest.mark.parametrize("num_tokens", [1, 7, 97, 1031])
def test_quant_pack_bytes_equal_torch(num_tokens):
    plan = plan_of(MIXED)
    _, _, fp8_scale = small_stream(128, MIXED)
    coeffs = coefficient_cases(num_tokens, MIXED)
    ref = encode_coefficients(coeffs, MIXED, fp8_scale)  # the codec's torch quantizer
    out = quant_pack(coeffs, plan, fp8_scale)
    assert torch.equal(out, ref)
    assert torch.equal(quant_pack_ref(coeffs, plan, fp8_scale), ref)  # the kernel's own reference agrees
    assert torch.equal(dequant_ref(out, plan, fp8_scale, num_tokens), decode_coefficients(ref, MIXED, fp8_scale,
                                                                                          num_tokens, MIXED.rank))


@pytest.mark.parametrize("size", [256, 1024])
def test_quant_pack_large_groups(size):
    """Groups wider than one column block (256 and 1024 components) reduce min/max over several chunks."""
    alloc = Allocation((Group(0, size, "int4"), Group(size, 64, "int2")))
    plan = plan_of(alloc)
    coeffs = coefficient_cases(33, alloc)
    fp8_scale = torch.ones(alloc.rank, device=DEVICE)
    assert torch.equal(quant_pack(coeffs, plan, fp8_scale), encode_coefficients(coeffs, alloc, fp8_scale))


def test_fp8_bits_equal_torch_on_every_boundary():
    """Round-to-nearest-even at every binade, subnormals, signed zeros and saturation, as torch rounds."""
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).float()
    values = values[torch.isfinite(values)]
    mids = (values[:-1] + values[1:]) / 2  # ties between neighbours (sorted within each sign)
    cases = torch.cat([values, mids, values * 1.0001, values * 0.9999, torch.tensor([-0.0, 1e-5, -1e-5, 600.0])])
    n = cases.numel()
    alloc = Allocation(tuple(Group(i, 1, "fp8") for i in range(4)))
    plan = plan_of(alloc)
    coeffs = cases.reshape(-1, 1).repeat(1, 4).contiguous().to(DEVICE)  # [n, 4]
    scale = torch.ones(4, device=DEVICE)
    out = quant_pack(coeffs, plan, scale)
    assert out.numel() == 4 * n
    assert torch.equal(out, encode_coefficients(coeffs, alloc, scale))


@pytest.mark.parametrize("num_tokens", [1, 7, 97, 1031])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_into_pool_matches_reference(num_tokens, dtype, page_size):
    num_l, heads, head_dim = 2, 2, 32
    basis, mean, fp8_scale = small_stream(num_l * heads * head_dim, MIXED, seed=7)
    dec_basis = basis.t().contiguous()  # [R, F]
    rope = RopeConfig(theta=1e4, rotary_dim=32)
    plan = plan_of(MIXED)
    payload = encode_coefficients(coefficient_cases(num_tokens, MIXED) / 1e3, MIXED, fp8_scale)
    rows = (num_tokens // page_size + 4) * page_size
    slots = paged_slots(num_tokens, page_size, rows, seed=3, device=DEVICE)
    pos = torch.arange(9, 9 + num_tokens)
    ref = pool(num_l, rows, heads, head_dim, dtype, seed=11)
    out = [b.clone() for b in ref]
    decode_into_ref(payload, plan, fp8_scale, dec_basis, mean, tables(rope, pos), ref, slots)
    decode_into(payload, plan, fp8_scale, dec_basis, mean, tables(rope, pos), LayerTable(out, heads, head_dim), slots)
    untouched = torch.ones(rows, dtype=torch.bool, device=DEVICE)
    untouched[slots] = False
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a[untouched], b[untouched])  # nothing written outside the slots
        scale = float(b[slots].float().abs().max())
        torch.testing.assert_close(a[slots].float(), b[slots].float(), atol=ULP[dtype] * scale, rtol=0)


def test_decode_dequantizes_exactly():
    """Identity basis, no RoPE, fp32 pool: the kernel's dequantized coefficients are torch's, bit for bit."""
    alloc = Allocation((Group(0, 4, "fp8"), Group(4, 16, "int8"), Group(20, 6, "int4"), Group(26, 6, "int2")))
    plan = plan_of(alloc)
    num_t = 97
    fp8_scale = torch.linspace(0.5, 2.0, alloc.rank, device=DEVICE)
    payload = encode_coefficients(coefficient_cases(num_t, alloc), alloc, fp8_scale)
    eye = torch.eye(32, device=DEVICE)
    out = [torch.zeros(num_t, 1, 32, device=DEVICE)]
    decode_into(payload, plan, fp8_scale, eye, torch.zeros(32, device=DEVICE), None, LayerTable(out, 1, 32),
                torch.arange(num_t, device=DEVICE))  # fmt: skip
    ref = decode_coefficients(payload, alloc, fp8_scale, num_t, alloc.rank)
    assert torch.equal(out[0][:, 0], ref)


def test_bad_inputs_are_refused_with_the_expected_values():
    bufs = pool(2, 10, 2, 32, torch.float16, seed=0)
    with pytest.raises(ValueError, match=r"\[N, H=3, D=32\]"):
        LayerTable(bufs, 3, 32)
    with pytest.raises(ValueError, match="layer 1 buffer is"):
        LayerTable([bufs[0], bufs[1].float()], 2, 32)
    table = LayerTable(bufs, 2, 32)
    with pytest.raises(ValueError, match=r"slots must lie in \[0, 10\), got \[0, 10\]"):
        table.check_slots(torch.tensor([0, 10]))
    basis, mean, fp8_scale = small_stream(128, MIXED)
    with pytest.raises(ValueError, match=r"mean must be \[F=128\] float32 on \S+, got \[5\] float32"):
        project(table, torch.tensor([1]), mean[:5], basis, None)
    plan = plan_of(MIXED)
    with pytest.raises(ValueError, match=r"out must be contiguous \[nbytes=\d+\] uint8 on \S+, got \[5\] uint8"):
        quant_pack(torch.zeros(3, MIXED.rank, device=DEVICE), plan, fp8_scale, out=torch.zeros(5, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"payload for T=2 must be \[nbytes=\d+\] uint8 on \S+, got \[3\]"):
        decode_into(torch.zeros(3, dtype=torch.uint8, device=DEVICE), plan, fp8_scale, basis.t().contiguous(), mean,
                    None, table, torch.tensor([0, 1]))  # fmt: skip


@pytest.mark.parametrize("precision", ["tf32x3", "tf32"])
def test_tensor_core_precisions_stay_close(precision):
    """Faster dot precisions (tensor cores on a GPU; the interpreter computes fp32) within TF32's error."""
    num_l, heads, head_dim, num_t = 2, 2, 32, 33
    basis, mean, _ = small_stream(num_l * heads * head_dim, MIXED, seed=9)
    bufs = pool(num_l, 40, heads, head_dim, torch.float16, seed=3)
    slots = paged_slots(num_t, 1, 40, seed=6, device=DEVICE)
    ref = project_ref(bufs, slots, mean, basis, None)
    out = project(LayerTable(bufs, heads, head_dim), slots, mean, basis, None, precision=precision)
    torch.testing.assert_close(out, ref, atol=2e-3 * float(ref.abs().max()), rtol=0)
    with pytest.raises(ValueError, match="dot precision must be one of"):
        project(LayerTable(bufs, heads, head_dim), slots, mean, basis, None, precision="bf16")
