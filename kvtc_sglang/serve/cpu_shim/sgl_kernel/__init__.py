"""CPU development shim for ``sgl_kernel`` (NOT the real package; kvtc-sglang's CPU serving only).

SGLang 0.5.23's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) imports a few CPU ops of ``sgl_kernel`` at module
level. The CPU build of ``sgl_kernel`` is not published on PyPI (the wheels there are CUDA builds), so
``python -m kvtc_sglang.serve`` puts this directory on ``PYTHONPATH`` when, and only when, it serves on a
machine without CUDA and without an importable real ``sgl_kernel``.

It implements the two non-speculative functions in plain torch and registers no ``torch.ops.sgl_kernel``
ops, so SGLang's AMX check (``hasattr(torch.ops.sgl_kernel, "convert_weight_packed")``) stays false and
every layer takes its native-torch path. The speculative-decoding ops raise ``NotImplementedError``.
"""

from __future__ import annotations

import ctypes

import torch

__version__ = "0.0.0+kvtc-cpu-shim"
KVTC_CPU_SHIM = True

if torch.cuda.is_available():
    raise ImportError(
        "kvtc_sglang's CPU sgl_kernel shim is on the path of a CUDA machine; remove it from PYTHONPATH and "
        "install the real sgl_kernel"
    )


def assign_req_to_token_pool_cpu(  # noqa: PLR0917 (SGLang calls it positionally)
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write each request's new slots into its row of the request-to-token table (in place).

    Args:
        req_pool_indices: ``[B]`` int, row of ``req_to_token`` of each request.
        req_to_token: ``[num_reqs, pool_len]`` int32, written at ``[row_i, start_i:end_i]``.
        start_offset, end_offset: ``[B]`` int, token range of each request.
        out_cache_loc: ``[sum(end - start)]`` int, the slots, request after request.
        pool_len: ``req_to_token.shape[1]``.
    """
    if req_to_token.shape[1] != pool_len:
        raise ValueError(f"pool_len {pool_len} != req_to_token.shape[1] {req_to_token.shape[1]}")
    starts = start_offset.tolist()
    ends = end_offset.tolist()
    rows = req_pool_indices.tolist()
    offset = 0
    for row, start, end in zip(rows, starts, ends, strict=True):
        n = end - start
        if n > 0:
            req_to_token[row, start:end] = out_cache_loc[offset : offset + n].to(req_to_token.dtype)
        offset += n


def _rows_view(ptr: int, row_bytes: int, num_rows: int) -> torch.Tensor:
    """A ``[num_rows, row_bytes]`` uint8 tensor over existing memory at address ``ptr`` (no copy)."""
    raw = (ctypes.c_uint8 * (row_bytes * num_rows)).from_address(ptr)
    return torch.frombuffer(raw, dtype=torch.uint8).view(num_rows, row_bytes)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """For every buffer ``b`` (a K or V buffer of one layer), copy row ``src_loc[i]`` to row ``tgt_loc[i]``.

    Args:
        data_ptrs: ``[NB]`` uint64/int64, base address of each buffer.
        strides: ``[NB]`` int, bytes per row (one token's slot) of each buffer.
        tgt_loc, src_loc: ``[N]`` int, target and source rows (sources are read before any write,
            so overlapping moves are safe, as in SGLang's Triton kernel).
    """
    if tgt_loc.numel() != src_loc.numel():
        raise ValueError(f"tgt_loc has {tgt_loc.numel()} rows, src_loc {src_loc.numel()}")
    if tgt_loc.numel() == 0:
        return
    tgt = tgt_loc.to(torch.int64)
    src = src_loc.to(torch.int64)
    num_rows = int(torch.maximum(tgt.max(), src.max())) + 1
    for ptr, row_bytes in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        rows = _rows_view(int(ptr) & (2**64 - 1), int(row_bytes), num_rows)
        rows[tgt] = rows[src]  # the gather copies first


def _speculative(name: str):  # noqa: ANN202
    def op(*_args: object, **_kwargs: object) -> None:
        raise NotImplementedError(
            f"sgl_kernel.{name}: speculative decoding is not available with kvtc_sglang's CPU sgl_kernel shim"
        )

    op.__name__ = name
    return op


# Imported at module level by SGLang's speculative-decoding modules on CPU; never called without
# speculative decoding.
assign_draft_cache_locs_contiguous_cpu = _speculative("assign_draft_cache_locs_contiguous_cpu")
assign_extend_cache_locs_cpu = _speculative("assign_extend_cache_locs_cpu")
build_tree_kernel_efficient_cpu = _speculative("build_tree_kernel_efficient_cpu")
verify_tree_greedy_cpu = _speculative("verify_tree_greedy_cpu")
fill_accept_out_cache_loc_cpu = _speculative("fill_accept_out_cache_loc_cpu")
fill_bonus_tokens_cpu = _speculative("fill_bonus_tokens_cpu")
rotate_input_ids_cpu = _speculative("rotate_input_ids_cpu")
SPECULATIVE_OPS = (
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "build_tree_kernel_efficient_cpu",
    "verify_tree_greedy_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "rotate_input_ids_cpu",
)
