"""Helpers shared by the kernels: exact rounding and fp8 bit conversions, tensor checks, pool and RoPE tables.

Rounding and fp8 conversion are written with integer and magic-number arithmetic instead of hardware
conversions so that compiled kernels, the Triton CPU interpreter and torch produce the same bits (the
interpreter rounds fp8 ties away from zero and flushes fp8 subnormals; torch rounds to nearest even).

This package imports nothing from :mod:`kvtc_sglang.codec`: the codec's Triton backend
(:mod:`kvtc_sglang.codec.backend_triton`) hands the kernels plain tensors, a :class:`RopeTables` and a
:class:`~.plan.StreamPlan`; the payload vocabulary both share is :mod:`kvtc_sglang.payload_format`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..devcopy import tensor_on, to_device
from ..payload_format import FP8_MAX, FP16_MAX

# tl.dot input precision of the projections: "ieee" is exact fp32 (FMA units); "tf32x3" (about fp32
# accuracy) and "tf32" (10-bit mantissa products) run on tensor cores. The interpreter computes fp32.
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
ROUND_MAGIC: tl.constexpr = tl.constexpr(12582912.0)  # 1.5 * 2**23: x + M - M rounds fp32 |x| < 2**22 to even
FP8_MAX_C: tl.constexpr = tl.constexpr(FP8_MAX)
FP16_MAX_C: tl.constexpr = tl.constexpr(FP16_MAX)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`DOT_PRECISIONS`, else ``ValueError``."""
    if precision not in DOT_PRECISIONS:
        raise ValueError(f"dot precision must be one of {DOT_PRECISIONS}, got {precision!r}")
    return precision


@triton.jit
def round_half_even(x):
    """``torch.round`` of fp32 ``x`` (any shape) with ``|x| < 2**22`` (callers clamp first)."""
    return (x + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def fp32_to_e4m3_bits(x):
    """fp32 ``x`` (any shape) with ``|x| <= FP8_MAX`` -> float8 e4m3fn bits (int32 in ``[0, 255]``), ties to even."""
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
    """float8 e4m3fn bit pattern (int32 in ``[0, 255]``, any shape) -> fp32 (exact)."""
    exp = (b >> 3) & 15
    man = (b & 7).to(tl.float32)
    normal = (((exp + 120) << 23).to(tl.float32, bitcast=True)) * (1.0 + man * 0.125)  # 2**(exp - 7)
    val = tl.where(exp == 0, man * 0.001953125, normal)  # subnormal: man * 2**-9
    return tl.where((b & 0x80) != 0, -val, val)


@triton.jit
def head_dims(HALF: tl.constexpr, HALF_P: tl.constexpr, REST_P: tl.constexpr, GPTJ: tl.constexpr):
    """Dims of one head: ``dim_a``, ``dim_b`` ``[HALF_P]`` (the RoPE pairs), ``dim_c`` ``[max(REST_P, 16)]``
    (the unrotated rest) and the ``[HALF_P]`` mask of real pairs. Values use the same split, unrotated."""
    i = tl.arange(0, HALF_P)
    if GPTJ:
        dim_a = 2 * i
        dim_b = 2 * i + 1
    else:
        dim_a = i
        dim_b = HALF + i
    dim_c = 2 * HALF + tl.arange(0, REST_P if REST_P > 0 else 16)
    return dim_a, dim_b, dim_c, i < HALF


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton dtype of a KV-pool dtype (fp16, bf16 or fp32)."""
    if dtype not in _TL_DTYPES:
        raise ValueError(f"KV dtype must be one of {list(_TL_DTYPES)}, got {dtype}")
    return _TL_DTYPES[dtype]


def is_interpreted(kernel: object) -> bool:
    """True when Triton was imported with ``TRITON_INTERPRET=1`` (kernels run on the CPU in numpy)."""
    return type(kernel).__name__ == "InterpretedFunction"


def launch_device(kernel: object, device: torch.device) -> torch.device:
    """``device`` if ``kernel`` can run there: CUDA, or any device under the interpreter."""
    if device.type != "cuda" and not is_interpreted(kernel):
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 on the CPU), got {device}")
    return device


def check_tensor(
    x: torch.Tensor,
    shape: Sequence[tuple[str, int | None]],
    dtype: torch.dtype,
    device: torch.device,
    name: str,
    *,
    contiguous: bool = False,
) -> torch.Tensor:
    """``x`` if it has ``shape`` (named dims, ``None``: any size), ``dtype`` and ``device``, else ``ValueError``.

    The message names the tensor and gives expected and actual values, e.g.
    ``mean must be [F=128] float32 on cpu, got [5] float32 on cpu``.
    """
    want = "[" + ", ".join(d if n is None else f"{d}={n}" for d, n in shape) + "]"
    ok_shape = x.dim() == len(shape) and all(n is None or x.shape[i] == n for i, (_, n) in enumerate(shape))
    ok = ok_shape and x.dtype == dtype and x.device == device and (x.is_contiguous() or not contiguous)
    if not ok:
        layout = "contiguous " if contiguous else ""
        got = f"{list(x.shape)} {x.dtype} on {x.device}{'' if x.is_contiguous() else ' (strided)'}"
        raise ValueError(f"{name} must be {layout}{want} {dtype} on {device}, got {got}".replace("torch.", ""))
    return x


class LayerTable:
    """Per-layer ``[N, H, D]`` buffers (SGLang's ``k_buffer``/``v_buffer`` lists) as a pointer table.

    Args:
        buffers: ``L`` tensors ``[N, H, D]`` of one dtype on one device; rows may be strided
            (``stride(0)`` is the row stride, shared by all layers) but each row's ``[H, D]`` is contiguous.
    """

    def __init__(self, buffers: Sequence[torch.Tensor], num_heads: int, head_dim: int) -> None:
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
        self.ptrs = tensor_on([b.data_ptr() for b in buffers], torch.int64, first.device)  # [L], no host wait
        self.row_stride = first.stride(0)
        self.num_rows = first.shape[0]
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.dtype = first.dtype
        self.device = first.device
        self.num_layers = len(buffers)

    @property
    def num_features(self) -> int:
        """``F = L * H * D``."""
        return self.num_layers * self.num_heads * self.head_dim

    def check_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """``slots [T]`` integer row indices on the buffers' device, each in ``[0, N)``, as int64: checked on the
        host for host tensors (``ValueError``), by a device-side assert for CUDA tensors (no host wait)."""
        if slots.dim() != 1 or slots.dtype.is_floating_point:
            raise ValueError(f"slots must be a 1-D integer tensor, got {slots.dtype} {list(slots.shape)}")
        slots = to_device(slots, self.device).to(torch.int64)
        if not slots.numel():
            return slots
        if slots.is_cuda:  # a bound check on the host would wait for the stream: a device-side assert instead
            inside = ((slots >= 0) & (slots < self.num_rows)).all()
            torch._assert_async(inside, f"slots must lie in [0, {self.num_rows})")
        elif int(slots.min()) < 0 or int(slots.max()) >= self.num_rows:
            raise ValueError(f"slots must lie in [0, {self.num_rows}), got [{int(slots.min())}, {int(slots.max())}]")
        return slots


@dataclass(frozen=True)
class RopeTables:
    """The keys' rotary embedding as the kernels read it (built by the codec's Triton backend).

    Attributes:
        cos, sin: ``[L', T, rotary_dim / 2]`` fp32, angles of each token's position; ``L' = 1`` when every
            layer shares one RoPE, else ``L' = L``.
        rotary_dim: dims of each head that are rotated (the first ``rotary_dim``; the rest are not).
        gptj: pairs are neighbouring dims ``(2i, 2i + 1)``; else NeoX rotate-half ``(i, i + rotary_dim / 2)``.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    rotary_dim: int
    gptj: bool

    @property
    def layer_stride(self) -> int:
        """Elements between two layers' tables (0: one table for every layer)."""
        return 0 if self.cos.shape[0] == 1 else self.cos.shape[1] * self.cos.shape[2]


@dataclass(frozen=True)
class RopeArgs:
    """What a launcher passes the kernels about RoPE (see :func:`rope_args`)."""

    half: int  # HALF: dims paired per half
    half_p: int  # HALF_P: its padded block
    rest_p: int  # REST_P: padded block of the unrotated dims (0: none)
    cos: torch.Tensor  # [L', T, HALF] fp32 (a placeholder without RoPE)
    sin: torch.Tensor
    stride: int  # layer stride of cos/sin (0: one table for every layer)
    rotate: bool
    gptj: bool


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


def rope_args(rope: RopeTables | None, table: LayerTable, num_tokens: int, placeholder: torch.Tensor) -> RopeArgs:
    """Checks ``rope`` against the pool and the token count; ``rope=None`` (values) splits ``D`` in halves."""
    half, half_p, rest_p = rope_layout(rope.rotary_dim if rope else table.head_dim, table.head_dim, rope is not None)
    if rope is None:
        return RopeArgs(half, half_p, rest_p, placeholder, placeholder, 0, False, False)
    if rope.rotary_dim > table.head_dim:
        raise ValueError(f"rotary_dim {rope.rotary_dim} exceeds head_dim {table.head_dim}")
    layers = rope.cos.shape[0] if rope.cos.dim() == 3 else -1
    if layers not in (1, table.num_layers):
        raise ValueError(f"need one RoPE table or one per layer ({table.num_layers}), got {layers}")
    for name, t in (("rope cos", rope.cos), ("rope sin", rope.sin)):
        check_tensor(t, (("L'", layers), ("T", num_tokens), ("HALF", half)), torch.float32, table.device, name,
                     contiguous=True)  # fmt: skip
    return RopeArgs(half, half_p, rest_p, rope.cos, rope.sin, rope.layer_stride, True, rope.gptj)


def rotate_ref(x: torch.Tensor, rope: RopeTables, sign: float) -> torch.Tensor:
    """Plain-torch rotation of ``x [L, T, H, D]`` by ``sign`` times the table angles: float32 ``[L, T, H, D]``."""
    cos = rope.cos.to(x.device)[:, :, None, :]  # [L', T, 1, rotary/2]
    sin = sign * rope.sin.to(x.device)[:, :, None, :]
    xf = x.to(torch.float32)
    rot, rest = xf[..., : rope.rotary_dim], xf[..., rope.rotary_dim :]
    half = rope.rotary_dim // 2
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if rope.gptj else (rot[..., :half], rot[..., half:])  # [L, T, H, D/2]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    out = torch.stack([y1, y2], dim=-1).flatten(-2) if rope.gptj else torch.cat([y1, y2], dim=-1)
    return torch.cat([out, rest], dim=-1)


@dataclass(frozen=True)
class Tiles:
    """Block sizes of one kernel on one target (the candidates ``triton.autotune`` would start from)."""

    block_t: int  # tokens per program
    block_r: int  # components per program (project) or per inner step (decode, quant-pack columns)


def tiles(table: dict[str, Tiles], kernel: object) -> Tiles:
    """The kernel's tiles for where it runs: ``"interpreter"`` (pays per program, not per element) or ``"cuda"``."""
    return table["interpreter" if is_interpreted(kernel) else "cuda"]
