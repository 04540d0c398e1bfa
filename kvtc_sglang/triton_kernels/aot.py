"""The ahead-of-time compile list: every variant of every kernel, as its launcher would launch it on a GPU.

Each :class:`AotSpec` holds a ``@triton.jit`` kernel, the types of the runtime arguments its launcher
passes and the meta-parameters (constexprs and compile options) the launcher computes with the very
functions it launches with (:func:`~.project.project_meta`, :func:`~.decode.decode_meta`,
:func:`~.quant_pack.quant_pack_meta`) and the tiles of its tile table. ``benchmarks/aot_compile.py``
compiles them with ``triton.compile(ASTSource(...), target=GPUTarget(...))``, which needs no GPU, but
does need the kernels imported without ``TRITON_INTERPRET`` (under it they are ``InterpretedFunction``).

Variants: pool dtype fp16/bf16; keys with NeoX or GPT-J RoPE and values without; each
:data:`~.common.DOT_PRECISIONS`; head geometries of :data:`GEOMETRIES`; for quantize-and-pack each coded
group kind and each column block the launcher picks (16 up to the tile table's largest).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from ..payload_format import GroupKind
from .common import DOT_PRECISIONS
from .decode import DECODE_TILES, _decode_kernel, decode_meta
from .meta import PoolShape, rope_split
from .project import PROJECT_TILES, _project_kernel, project_meta
from .quant_pack import QUANT_PACK_TILES, _quant_pack_kernel, quant_pack_meta

TARGETS = {"sm90": ("cuda", 90, 32), "sm100": ("cuda", 100, 32)}  # GPUTarget(backend, arch, warp size)
POOL_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
ROPE_STYLES = ("neox", "gptj", "values")  # keys rotated NeoX / GPT-J style; values not rotated
QUANT_KINDS = tuple(k for k in GroupKind if k is not GroupKind.DROP)
QUANT_GROUP_SIZES = (16, 32, 64, 128, 256)  # largest group of a class -> BLOCK_C 16 ... 256 (the launcher clamps)


@dataclass(frozen=True)
class Geometry:
    """A model's K/V head geometry (the layer and head counts are loop bounds; the head split shapes tiles)."""

    name: str
    num_layers: int
    num_heads: int
    head_dim: int
    rotary_dim: int


GEOMETRIES = (
    Geometry("d64", 30, 3, 64, 64),  # SmolLM2-135M, the artifact of the tests and benchmarks
    Geometry("d128", 32, 8, 128, 128),  # Llama-3-8B / Qwen2.5-7B heads
    Geometry("d64-rot32", 30, 3, 64, 32),  # partial rotary: the unrotated rest dims (REST_P > 0), keys only
)

# Runtime (non-constexpr) arguments, in order, with the types Triton gives what the launchers pass
# (``triton.runtime.jit.mangle_type``); tests/test_aot_compile.py checks them against real launches.
PROJECT_ARGS = {
    "layer_ptrs": "*i64", "slots_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "mean_ptr": "*fp32",
    "basis_ptr": "*fp32", "out_ptr": "*fp32", "num_tokens": "i32", "rank": "i32", "row_stride": "i32",
    "rope_stride": "i32",
}  # fmt: skip
DECODE_ARGS = {
    "payload_ptr": "*u8", "comp_group": "*i32", "group_start": "*i32", "group_bits": "*i32", "group_kind": "*i32",
    "group_off": "*i64", "fp8_scale_ptr": "*fp32", "basis_ptr": "*fp32", "mean_ptr": "*fp32", "cos_ptr": "*fp32",
    "sin_ptr": "*fp32", "layer_ptrs": "*i64", "slots_ptr": "*i64", "num_tokens": "i32", "rank": "i32",
    "row_stride": "i32", "rope_stride": "i32",
}  # fmt: skip
QUANT_PACK_ARGS = {
    "coeffs_ptr": "*fp32", "out_ptr": "*u8", "fp8_scale_ptr": "*fp32", "group_ids": "*i32", "group_start": "*i32",
    "group_size": "*i32", "group_off": "*i64", "num_tokens": "i32", "rank": "i32",
}  # fmt: skip


@dataclass(frozen=True)
class AotSpec:
    """One kernel variant: what ``triton.compile`` needs, and the axes it was picked on."""

    kernel: str  # "project", "decode" or "quant_pack"
    variant: str  # e.g. "bf16/neox/ieee/d64" or "int4/c64"
    fn: Any  # the @triton.jit kernel
    args: dict[str, str]  # runtime argument -> Triton type
    constexprs: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)  # compile options the launcher passes

    @property
    def name(self) -> str:
        return f"{self.kernel}/{self.variant}"

    @property
    def signature(self) -> dict[str, str]:
        """``ASTSource`` signature: every kernel parameter, the constexprs typed ``"constexpr"``."""
        sig = {a: self.args.get(a, "constexpr") for a in self.fn.arg_names}
        extra = set(self.args) ^ {a for a, t in sig.items() if t != "constexpr"}
        if extra or set(self.constexprs) != {a for a, t in sig.items() if t == "constexpr"}:
            raise ValueError(f"{self.name}: arguments and constexprs do not match {self.fn.arg_names}")
        return sig

    @property
    def tile(self) -> str:
        c = self.constexprs
        return f"{c['BLOCK_T']}x{c['BLOCK_R'] if 'BLOCK_R' in c else c['BLOCK_C']}"


def split_meta(fn: Any, meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A launch's keyword arguments split into the kernel's constexprs and compile options (``enable_fp_fusion``)."""
    constexprs = {k: v for k, v in meta.items() if k in fn.arg_names}
    return constexprs, {k: v for k, v in meta.items() if k not in constexprs}


def _head_specs(kernel: str, tiles_key: str) -> list[AotSpec]:
    fn, args, meta_fn, table = {
        "project": (_project_kernel, PROJECT_ARGS, project_meta, PROJECT_TILES),
        "decode": (_decode_kernel, DECODE_ARGS, decode_meta, DECODE_TILES),
    }[kernel]
    out = []
    for geo, dname, style, prec in itertools.product(GEOMETRIES, POOL_DTYPES, ROPE_STYLES, DOT_PRECISIONS):
        if style == "values" and geo.rotary_dim != geo.head_dim:
            continue  # values are never rotated: same kernel as the full-rotary geometry's
        pool = PoolShape(geo.num_layers, geo.num_heads, geo.head_dim, POOL_DTYPES[dname])
        rope = rope_split(geo.head_dim, None if style == "values" else geo.rotary_dim, gptj=style == "gptj")
        constexprs, options = split_meta(fn, meta_fn(pool, rope, table[tiles_key], prec))
        out.append(AotSpec(kernel, f"{dname}/{style}/{prec}/{geo.name}", fn, args, constexprs, options))
    return out


def _quant_pack_specs(tiles_key: str) -> list[AotSpec]:
    out: dict[str, AotSpec] = {}  # group sizes past the tile's largest column block share its variant
    for kind, size in itertools.product(QUANT_KINDS, QUANT_GROUP_SIZES):
        meta = quant_pack_meta(kind, size, QUANT_PACK_TILES[tiles_key])
        constexprs, options = split_meta(_quant_pack_kernel, meta)
        variant = f"{kind.value}/c{constexprs['BLOCK_C']}"
        out[variant] = AotSpec("quant_pack", variant, _quant_pack_kernel, QUANT_PACK_ARGS, constexprs, options)
    return list(out.values())


def aot_specs(tiles_key: str = "cuda") -> list[AotSpec]:
    """Every variant of every kernel with the tiles of ``tiles_key`` (``"cuda"``: what a GPU launch uses)."""
    return [*_head_specs("project", tiles_key), *_head_specs("decode", tiles_key), *_quant_pack_specs(tiles_key)]


def cover(specs: list[AotSpec]) -> list[AotSpec]:
    """A representative subset (for CI): per kernel, every geometry x dot precision once (pool dtype and RoPE
    style rotating through them), and every quantize-and-pack variant (they compile in seconds)."""
    chosen: list[AotSpec] = []
    for kernel in ("project", "decode"):
        mine = [s for s in specs if s.kernel == kernel]
        for i, (geo, prec) in enumerate(itertools.product(GEOMETRIES, DOT_PRECISIONS)):
            styles = ROPE_STYLES if geo.rotary_dim == geo.head_dim else ROPE_STYLES[:2]
            dname, style = list(POOL_DTYPES)[i % len(POOL_DTYPES)], styles[i % len(styles)]
            chosen += [s for s in mine if s.variant == f"{dname}/{style}/{prec}/{geo.name}"]
    return chosen + [s for s in specs if s.kernel == "quant_pack"]
