"""Helpers shared by the kernels: exact rounding and fp8 bit conversions, layer pointer tables, checks.

Rounding and fp8 conversion are written with integer and magic-number arithmetic instead of hardware
conversions so that compiled kernels, the Triton CPU interpreter and torch produce the same bits (the
interpreter rounds fp8 ties away from zero and flushes fp8 subnormals; torch rounds to nearest even).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..codec.codec import DOT_PRECISIONS

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def check_precision(precision: str) -> str:
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"dot precision must be one of {DOT_PRECISIONS}, got {precision!r}")
    return precision


@triton.jit
def round_half_even(x):
    """``torch.round`` of fp32 ``x`` with ``|x| < 2**22`` (callers clamp first)."""
    return (x + 12582912.0) - 12582912.0


@triton.jit
def fp32_to_e4m3_bits(x):
    """fp32 ``x`` with ``|x| <= 448`` -> float8 e4m3fn bit pattern (int32 in ``[0, 255]``), round to nearest even."""
    bits = x.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    a = tl.abs(x)
    e = ((a.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    e = tl.maximum(e, -6)  # below 2**-6 the grid is the subnormal one, 2**-9
    magic = (((e - 3 + 23 + 127) << 23) | 0x400000).to(tl.float32, bitcast=True)  # 1.5 * 2**(e - 3 + 23)
    r = (a + magic) - magic  # a rounded to a multiple of 2**(e - 3), ties to even
    rb = r.to(tl.int32, bitcast=True)
    er = ((rb >> 23) & 0xFF) - 127
    normal = ((er + 7) << 3) | ((rb >> 20) & 7)
    sub = (r * 512.0).to(tl.int32)
    code = tl.where(er >= -6, normal, sub)
    return code | (sign << 7)


@triton.jit
def e4m3_bits_to_fp32(b):
    """float8 e4m3fn bit pattern (int32 in ``[0, 255]``) -> fp32 (exact)."""
    exp = (b >> 3) & 15
    man = (b & 7).to(tl.float32)
    normal = (((exp + 120) << 23).to(tl.float32, bitcast=True)) * (1.0 + man * 0.125)  # 2**(exp - 7)
    val = tl.where(exp == 0, man * 0.001953125, normal)  # subnormal: man * 2**-9
    return tl.where((b & 0x80) != 0, -val, val)


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    if dtype not in _TL_DTYPES:
        raise ValueError(f"KV dtype must be one of {list(_TL_DTYPES)}, got {dtype}")
    return _TL_DTYPES[dtype]


def is_interpreted(kernel: object) -> bool:
    """True when Triton was imported with ``TRITON_INTERPRET=1`` (kernels run on the CPU in numpy)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_device(kernel: object, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; CUDA unless the kernel runs in the interpreter."""
    device = tensors[0].device
    for t in tensors:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}")
    return device


class LayerTable:
    """Per-layer ``[N, H, D]`` buffers (SGLang's ``k_buffer``/``v_buffer`` lists) as a pointer table.

    Args:
        buffers: ``L`` tensors ``[N, H, D]`` of one dtype on one device; rows may be strided
            (``stride(0)`` is the row stride, shared by all layers) but each row's ``[H, D]`` is contiguous.
    """

    def __init__(self, buffers: list[torch.Tensor] | tuple[torch.Tensor, ...], num_heads: int, head_dim: int) -> None:
        if not buffers:
            raise ValueError("need at least one layer buffer")
        first = buffers[0]
        for i, b in enumerate(buffers):
            if b.dim() != 3 or tuple(b.shape[1:]) != (num_heads, head_dim):
                raise ValueError(f"layer {i} buffer must be [N, H={num_heads}, D={head_dim}], got {list(b.shape)}")
            if b.dtype != first.dtype or b.device != first.device:
                raise ValueError(f"layer {i} buffer is {b.dtype}/{b.device}, layer 0 is {first.dtype}/{first.device}")
            if b.stride(2) != 1 or (num_heads > 1 and b.stride(1) != head_dim) or b.stride(0) != first.stride(0):
                raise ValueError(
                    f"layer {i} buffer strides {b.stride()} do not match a row stride of {first.stride(0)} "
                    f"with contiguous [H, D] rows"
                )
            if b.shape[0] != first.shape[0]:
                raise ValueError(f"layer {i} buffer has {b.shape[0]} rows, layer 0 has {first.shape[0]}")
        self.buffers = list(buffers)
        self.ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device=first.device)  # [L]
        self.row_stride = first.stride(0)
        self.num_rows = first.shape[0]
        self.dtype = first.dtype
        self.device = first.device
        self.num_layers = len(buffers)

    def check_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """``slots [T]`` integer row indices on the buffers' device, each in ``[0, N)``, as int64."""
        if slots.dim() != 1 or slots.dtype.is_floating_point:
            raise ValueError(f"slots must be a 1-D integer tensor, got {slots.dtype} {list(slots.shape)}")
        slots = slots.to(device=self.device, dtype=torch.int64)
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.num_rows):
            raise ValueError(f"slots must lie in [0, {self.num_rows}), got [{int(slots.min())}, {int(slots.max())}]")
        return slots


def rope_layout(rotary_dim: int, head_dim: int, rotate: bool) -> tuple[int, int, int]:
    """``(HALF, HALF_P, REST_P)``: dims paired by RoPE per half, its padded block, padded block of the rest.

    Values (``rotate=False``) are split into two halves of ``D / 2`` the same way, unrotated.
    """
    half = rotary_dim // 2 if rotate else head_dim // 2
    if not rotate and head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    rest = head_dim - 2 * half
    half_p = max(16, triton.next_power_of_2(half))
    rest_p = max(16, triton.next_power_of_2(rest)) if rest else 0
    return half, half_p, rest_p
