"""Every Triton kernel compiles ahead of time for sm_90 and sm_100 with no GPU (issue 30).

``benchmarks/aot_compile.py --cover`` compiles a representative cover of the variants (project and decode:
every geometry x dot precision, pool dtypes and RoPE styles rotating through them; every quantize-and-pack
variant) for both targets in a child process without ``TRITON_INTERPRET``; the full set (``aot_compile.py``
without ``--cover``, 208 compiles, several minutes on 2 cores) is the benchmark's (BENCHMARKS.md). Set
``KVTC_AOT_FULL=1`` to compile the full set here. The launchers themselves are run under the interpreter
with their kernel's ``run`` replaced by a recorder, to check that they launch exactly what the list compiles.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from triton.runtime.jit import mangle_type

from kvtc_sglang.payload_format import GroupKind
from kvtc_sglang.triton_kernels import LayerTable, RopeTables, StreamPlan
from kvtc_sglang.triton_kernels.aot import (
    DOT_PRECISIONS,
    GEOMETRIES,
    POOL_DTYPES,
    QUANT_GROUP_SIZES,
    QUANT_KINDS,
    ROPE_STYLES,
    TARGETS,
    AotSpec,
    aot_specs,
    cover,
)
from kvtc_sglang.triton_kernels.decode import _decode_kernel, decode_into
from kvtc_sglang.triton_kernels.project import _project_kernel, project
from kvtc_sglang.triton_kernels.quant_pack import _quant_pack_kernel, quant_pack

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from aot_compile import parse_ptxas  # noqa: E402

FULL = os.environ.get("KVTC_AOT_FULL") == "1"
SPECS = aot_specs()
COMPILED = SPECS if FULL else cover(SPECS)


def _aot_run(tmp: Path, *args: str) -> tuple[int, dict[str, Any], str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "aot_compile.py"), "--out", str(tmp), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
    result = tmp / "aot_compile.json"
    return proc.returncode, json.loads(result.read_text()) if result.exists() else {}, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> dict[tuple[str, str], dict[str, Any]]:
    """Rows of one AOT run of :data:`COMPILED` on both targets, by (kernel/variant, target)."""
    rc, result, log = _aot_run(tmp_path_factory.mktemp("aot"), *([] if FULL else ["--cover"]))
    assert result, log
    rows = {(f"{r['kernel']}/{r['variant']}", r["target"]): r for r in result["rows"]}
    assert rc == (1 if any(r["error"] for r in rows.values()) else 0), log
    return rows


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("spec", COMPILED, ids=lambda s: s.name)
def test_compiles(table, spec: AotSpec, target: str) -> None:
    row = table[(spec.name, target)]
    assert row["error"] is None, row["error"]
    assert 0 < row["registers"] <= 255 and row["num_warps"] == spec.options.get("num_warps", 4)
    assert row["shared"] <= 227 * 1024  # what one block may have on sm_90 and sm_100


def test_table_has_every_variant(table) -> None:
    assert set(table) == {(s.name, t) for s in COMPILED for t in TARGETS}
    kernels = {s.kernel for s in COMPILED}
    assert kernels == {"project", "decode", "quant_pack"}
    for kernel in ("project", "decode"):  # the cover reaches every value of every axis
        variants = [s.variant.split("/") for s in COMPILED if s.kernel == kernel]
        for axis, values in enumerate((POOL_DTYPES, ROPE_STYLES, DOT_PRECISIONS, [g.name for g in GEOMETRIES])):
            assert {v[axis] for v in variants} == set(values)
    quant = {s.variant for s in COMPILED if s.kernel == "quant_pack"}
    assert quant == {s.variant for s in SPECS if s.kernel == "quant_pack"}
    assert {v.split("/")[0] for v in quant} == {k.value for k in QUANT_KINDS}


def test_a_broken_variant_fails(tmp_path) -> None:
    """The check can fail: a column block that is not a power of two does not compile, and the run exits 1."""
    rc, result, log = _aot_run(tmp_path, "--only", "quant_pack/int4/c16", "--targets", "sm90", "--set", "BLOCK_C=24")
    assert rc == 1, log
    (row,) = result["rows"]
    assert row["error"] and "power of 2" in row["error"], row


def test_parse_ptxas() -> None:
    log = """ptxas info    : Compiling entry function '_k' for 'sm_90a'
ptxas info    : Function properties for _k
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size"""
    assert parse_ptxas(log) == {"registers": 255, "stack": 16, "spill_stores": 12, "spill_loads": 8}
    with pytest.raises(RuntimeError, match="one entry function"):
        parse_ptxas("ptxas info    : 0 bytes gmem")


# --- the launchers launch exactly what the AOT list compiles ------------------------------------------


class _Recorder:
    """Stands in for an interpreted kernel's ``run``: records the launch instead of running it."""

    def __init__(self) -> None:
        self.launches: list[tuple[tuple, dict[str, Any]]] = []

    def __call__(self, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        self.launches.append((args, kwargs))


def _check(spec: AotSpec, launch: tuple[tuple, dict[str, Any]]) -> None:
    args, kwargs = launch
    assert {n: mangle_type(a) for n, a in zip(spec.args, args, strict=True)} == spec.args, spec.name
    assert kwargs == {**spec.constexprs, **spec.options}, spec.name
    assert spec.signature  # arguments and constexprs name every kernel parameter once


@dataclass(frozen=True)
class _Group:
    start: int
    size: int
    kind: GroupKind


def _plan(groups: list[_Group]) -> StreamPlan:
    return StreamPlan.build(groups, sum(g.size for g in groups), torch.device("cpu"))


@pytest.fixture
def recorders(monkeypatch) -> dict[str, _Recorder]:
    kernels = {"project": _project_kernel, "decode": _decode_kernel, "quant_pack": _quant_pack_kernel}
    out = {}
    for name, kernel in kernels.items():
        if type(kernel).__name__ != "InterpretedFunction":
            pytest.skip("the launch check runs the launchers under TRITON_INTERPRET=1")
        out[name] = _Recorder()
        monkeypatch.setattr(kernel, "run", out[name])
    return out


def test_launchers_launch_what_is_compiled(recorders) -> None:
    """Every launcher variant (pool dtype x RoPE style x dot precision x geometry; group kind x column block)
    launches its kernel with the runtime argument types and meta-parameters of its AOT spec (the
    interpreter's tiles stand in for CUDA's: the tile table is the one difference)."""
    specs = {s.name: s for s in aot_specs("interpreter")}
    num_t, rank = 5, 16
    slots = torch.arange(num_t)
    for geo, dname, style, prec in itertools.product(GEOMETRIES, POOL_DTYPES, ROPE_STYLES, DOT_PRECISIONS):
        if style == "values" and geo.rotary_dim != geo.head_dim:
            continue
        bufs = [torch.zeros(8, geo.num_heads, geo.head_dim, dtype=POOL_DTYPES[dname]) for _ in range(geo.num_layers)]
        table = LayerTable(bufs, geo.num_heads, geo.head_dim)
        feat = table.num_features
        rope = None
        if style != "values":
            cs = torch.zeros(1, num_t, geo.rotary_dim // 2)
            rope = RopeTables(cs, cs, geo.rotary_dim, style == "gptj")
        mean, plan = torch.zeros(feat), _plan([_Group(0, rank, GroupKind.INT4)])
        project(table, slots, mean, torch.zeros(feat, rank), rope, precision=prec)
        payload = torch.zeros(plan.nbytes(num_t), dtype=torch.uint8)
        decode_into(payload, plan, torch.ones(rank), torch.zeros(rank, feat), mean, rope, table, slots, prec)
        name = f"{dname}/{style}/{prec}/{geo.name}"
        _check(specs[f"project/{name}"], recorders["project"].launches.pop())
        _check(specs[f"decode/{name}"], recorders["decode"].launches.pop())
    seen = set()
    for size in QUANT_GROUP_SIZES:  # one class per kind, its largest group ``size``: one launch each
        plan = _plan([_Group(i * size, size, kind) for i, kind in enumerate(QUANT_KINDS)])
        quant_pack(torch.zeros(num_t, plan.rank), plan, torch.ones(plan.rank))
        launches = recorders["quant_pack"].launches
        assert len(launches) == len(QUANT_KINDS)
        for kind, launch in zip(QUANT_KINDS, launches, strict=True):
            seen.add(name := f"quant_pack/{kind.value}/c{launch[1]['BLOCK_C']}")
            _check(specs[name], launch)
        launches.clear()
    assert seen == {s for s in specs if s.startswith("quant_pack/")}
    assert not any(r.launches for r in recorders.values())
