"""Fused encode, part 1: gather rows from the KV pool, remove RoPE, centre, project on the PCA basis.

``coeffs [T, R] = (unrope(pool[l][slots, h, :]) for every l, h  - mean) @ basis``, computed per
(token block, component block) program with ``tl.dot`` and fp32 accumulation; no ``[T, F]`` copy of the
K/V is ever made. The quantize-and-pack kernel (:mod:`.quant_pack`) turns the coefficients into bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..codec.rope import RopeConfig, remove_rope
from .common import LayerTable, check_device, check_precision, is_interpreted, rope_layout, tl_dtype


@triton.jit
def _head_dims(HALF: tl.constexpr, HALF_P: tl.constexpr, REST_P: tl.constexpr, GPTJ: tl.constexpr):
    i = tl.arange(0, HALF_P)
    if GPTJ:
        dim_a = 2 * i
        dim_b = 2 * i + 1
    else:
        dim_a = i
        dim_b = HALF + i
    dim_c = 2 * HALF + tl.arange(0, REST_P if REST_P > 0 else 16)
    return dim_a, dim_b, dim_c, i < HALF


@triton.jit
def _project_kernel(
    layer_ptrs, slots_ptr, cos_ptr, sin_ptr, mean_ptr, basis_ptr, out_ptr,
    num_tokens, rank, row_stride, rope_stride,
    # geometry
    L: tl.constexpr, H: tl.constexpr, D: tl.constexpr, DTYPE: tl.constexpr,
    HALF: tl.constexpr, HALF_P: tl.constexpr, REST_P: tl.constexpr,
    ROTATE: tl.constexpr, GPTJ: tl.constexpr,
    # tiling
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_r = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BR]
    t_ok = t < num_tokens
    r_ok = r < rank
    rows = tl.load(slots_ptr + t, mask=t_ok, other=0).to(tl.int64) * row_stride  # [BT]
    dim_a, dim_b, dim_c, d_ok = _head_dims(HALF, HALF_P, REST_P, GPTJ)
    c_ok = dim_c < D
    cs_off = t[:, None] * HALF + tl.arange(0, HALF_P)[None, :]
    cs_mask = t_ok[:, None] & d_ok[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for layer in range(L):
        base = tl.load(layer_ptrs + layer).to(tl.pointer_type(DTYPE))
        if ROTATE:  # rope_stride is 0 when every layer shares one RoPE
            cos = tl.load(cos_ptr + layer * rope_stride + cs_off, mask=cs_mask, other=0.0)  # [BT, HALF_P]
            sin = tl.load(sin_ptr + layer * rope_stride + cs_off, mask=cs_mask, other=0.0)
        for h in range(H):
            f0 = (layer * H + h) * D  # feature index of this head's dim 0
            head = base + rows[:, None] + h * D
            m_a = t_ok[:, None] & d_ok[None, :]
            xa = tl.load(head + dim_a[None, :], mask=m_a, other=0.0).to(tl.float32)  # [BT, HALF_P]
            xb = tl.load(head + dim_b[None, :], mask=m_a, other=0.0).to(tl.float32)
            if ROTATE:  # remove RoPE: rotate by -angle
                ya = xa * cos - xb * (-sin)
                yb = xb * cos + xa * (-sin)
            else:
                ya = xa
                yb = xb
            ya = ya - tl.load(mean_ptr + f0 + dim_a, mask=d_ok, other=0.0)[None, :]
            yb = yb - tl.load(mean_ptr + f0 + dim_b, mask=d_ok, other=0.0)[None, :]
            b_mask = d_ok[:, None] & r_ok[None, :]
            ba = tl.load(basis_ptr + (f0 + dim_a)[:, None].to(tl.int64) * rank + r[None, :], mask=b_mask, other=0.0)
            bb = tl.load(basis_ptr + (f0 + dim_b)[:, None].to(tl.int64) * rank + r[None, :], mask=b_mask, other=0.0)
            acc = tl.dot(tl.where(m_a, ya, 0.0), ba, acc, input_precision=PRECISION)
            acc = tl.dot(tl.where(m_a, yb, 0.0), bb, acc, input_precision=PRECISION)
            if REST_P > 0:  # dims past the rotary ones: unrotated
                m_c = t_ok[:, None] & c_ok[None, :]
                xc = tl.load(head + dim_c[None, :], mask=m_c, other=0.0).to(tl.float32)
                xc = xc - tl.load(mean_ptr + f0 + dim_c, mask=c_ok, other=0.0)[None, :]
                bc_mask = c_ok[:, None] & r_ok[None, :]
                bc = tl.load(
                    basis_ptr + (f0 + dim_c)[:, None].to(tl.int64) * rank + r[None, :], mask=bc_mask, other=0.0
                )
                acc = tl.dot(tl.where(m_c, xc, 0.0), bc, acc, input_precision=PRECISION)
    out = out_ptr + t[:, None].to(tl.int64) * rank + r[None, :]
    tl.store(out, acc, mask=t_ok[:, None] & r_ok[None, :])


def rope_tables(
    positions: torch.Tensor, rope: RopeConfig | Sequence[RopeConfig], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """cos, sin ``[L' , T, rotary_dim / 2]`` fp32 on ``device`` and the layer stride (0 when ``L' = 1``).

    ``rope`` is one config or one per layer (which must agree on rotary_dim and style); angles are
    computed in float64 as the torch path does.
    """
    from ..codec.rope import _cos_sin  # noqa: PLC0415 (one definition of the angles)

    ropes = [rope] if isinstance(rope, RopeConfig) else list(rope)
    if len({(r.rotary_dim, r.style) for r in ropes}) != 1:
        raise ValueError(f"per-layer RoPE configs must share rotary_dim and style, got {set(ropes)}")
    tables = {r: _cos_sin(positions.cpu(), r) for r in dict.fromkeys(ropes)}  # [T, 1, rotary/2] each
    cos = torch.stack([tables[r][0][:, 0] for r in ropes]).contiguous().to(device)  # [L', T, rotary/2]
    sin = torch.stack([tables[r][1][:, 0] for r in ropes]).contiguous().to(device)
    return cos, sin, (0 if len(ropes) == 1 else cos.shape[1] * cos.shape[2])


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


def rope_args(
    rope: RopeConfig | Sequence[RopeConfig] | None,
    positions: torch.Tensor | None,
    num_tokens: int,
    num_layers: int,
    head_dim: int,
    placeholder: torch.Tensor,
) -> RopeArgs:
    """Checks ``positions`` and builds the cos/sin tables for keys; ``rope=None`` (values) splits ``D`` in halves."""
    if rope is not None and not isinstance(rope, RopeConfig) and len(rope) != num_layers:
        raise ValueError(f"need one RoPE config per layer ({num_layers}), got {len(rope)}")
    rope0 = rope if rope is None or isinstance(rope, RopeConfig) else rope[0]
    half, half_p, rest_p = rope_layout(rope0.rotary_dim if rope0 else head_dim, head_dim, rope0 is not None)
    if rope0 is None:
        return RopeArgs(half, half_p, rest_p, placeholder, placeholder, 0, False, False)
    if positions is None or positions.shape != (num_tokens,):
        raise ValueError(f"positions must be [T={num_tokens}] with rope, got {positions}")
    cos, sin, stride = rope_tables(positions, rope, placeholder.device)
    return RopeArgs(half, half_p, rest_p, cos, sin, stride, True, rope0.style == "gptj")


def project(
    table: LayerTable,
    slots: torch.Tensor,
    mean: torch.Tensor,
    basis: torch.Tensor,
    rope: RopeConfig | Sequence[RopeConfig] | None,
    positions: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    precision: str = "ieee",
) -> torch.Tensor:
    """Coefficients of the pool rows at ``slots``.

    Args:
        table: the stream's per-layer buffers, ``L x [N, H, D]`` fp16/bf16/fp32.
        slots: ``[T]`` integer rows of the tokens to encode.
        mean: ``[F = L * H * D]`` fp32 calibration mean.
        basis: ``[F, R]`` fp32 encoding basis (per-feature scale folded in).
        rope: the model's RoPE for keys (removed before projecting), one config or one per layer;
            ``None`` for values.
        positions: ``[T]`` absolute positions, required with ``rope``.
        out: optional caller-owned ``[T, R]`` fp32 output.
        precision: ``tl.dot`` input precision, one of :data:`~.common.DOT_PRECISIONS`.

    Returns:
        ``[T, R]`` fp32 coefficients.
    """
    slots = table.check_slots(slots)
    num_t = slots.numel()
    feat = table.num_layers * table.buffers[0].shape[1] * table.buffers[0].shape[2]
    heads, head_dim = table.buffers[0].shape[1:]
    if mean.shape != (feat,) or mean.dtype != torch.float32:
        raise ValueError(f"mean must be [F={feat}] float32, got {list(mean.shape)} {mean.dtype}")
    if basis.dim() != 2 or basis.shape[0] != feat or basis.dtype != torch.float32 or not basis.is_contiguous():
        raise ValueError(f"basis must be contiguous [F={feat}, R] float32, got {list(basis.shape)} {basis.dtype}")
    rank = basis.shape[1]
    if out is None:
        out = torch.empty(num_t, rank, dtype=torch.float32, device=table.device)
    if out.shape != (num_t, rank) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be contiguous [T={num_t}, R={rank}] float32, got {list(out.shape)} {out.dtype}")
    check_device(_project_kernel, slots, mean, basis, out)
    ra = rope_args(rope, positions, num_t, table.num_layers, head_dim, placeholder=mean)
    if num_t == 0 or rank == 0:
        return out
    big = is_interpreted(_project_kernel)  # the interpreter pays per program, not per element
    block_t = 128 if big else 64
    block_r = 256 if big else 64
    grid = (triton.cdiv(num_t, block_t), triton.cdiv(rank, block_r))
    _project_kernel[grid](
        table.ptrs, slots, ra.cos, ra.sin, mean, basis, out,
        num_t, rank, table.row_stride, ra.stride,
        L=table.num_layers, H=heads, D=head_dim, DTYPE=tl_dtype(table.dtype),
        HALF=ra.half, HALF_P=ra.half_p, REST_P=ra.rest_p, ROTATE=ra.rotate, GPTJ=ra.gptj,
        BLOCK_T=block_t, BLOCK_R=block_r, PRECISION=check_precision(precision),
    )  # fmt: skip
    return out


def project_ref(
    buffers: list[torch.Tensor],
    slots: torch.Tensor,
    mean: torch.Tensor,
    basis: torch.Tensor,
    rope: RopeConfig | Sequence[RopeConfig] | None,
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-torch :func:`project`: gather ``[L, T, H, D]``, remove RoPE, ``[T, F] - mean`` then ``@ basis``."""
    x = torch.stack([b.index_select(0, slots.to(b.device)) for b in buffers])  # [L, T, H, D]
    if rope is not None:
        x = remove_rope(x, positions.to(x.device), rope)
    num_t = x.shape[1]
    feats = x.to(torch.float32).permute(1, 0, 2, 3).reshape(num_t, -1)  # [T, F]
    return (feats - mean) @ basis
