"""Read and write one radix node's K/V in SGLang's token-major KV pool.

``MHATokenToKVPool`` keeps, per layer, a K and a V buffer ``[num_slots, H, D]``; a paged view of the same
memory (``[num_pages, P, H, D]``) is what FlashInfer reads, so writing rows at slot indices is writing pages.
This module only touches the pool's ``k_buffer`` / ``v_buffer`` lists; it never imports the codec.
"""

from __future__ import annotations

import torch


class PoolKV:
    """The KV pool's per-layer buffers, checked against the geometry the codec was calibrated for.

    Args:
        pool: an SGLang ``MHATokenToKVPool`` (or any object with ``k_buffer``/``v_buffer`` lists of
            ``[num_slots, H, D]`` tensors).
        num_layers, num_kv_heads, head_dim: ``L``, ``H``, ``D`` the calibration expects.
    """

    def __init__(self, pool: object, num_layers: int, num_kv_heads: int, head_dim: int) -> None:
        k_bufs = getattr(pool, "k_buffer", None)
        v_bufs = getattr(pool, "v_buffer", None)
        if not isinstance(k_bufs, list) or not isinstance(v_bufs, list):
            raise ValueError(
                f"KVTC needs a multi-head KV pool with per-layer k_buffer/v_buffer lists (MHATokenToKVPool), "
                f"got {type(pool).__name__}; MLA and hybrid pools are not supported"
            )
        if len(k_bufs) != num_layers or len(v_bufs) != num_layers:
            raise ValueError(f"KV pool has {len(k_bufs)} layers, calibration has {num_layers}")
        want = (num_kv_heads, head_dim)
        for name, bufs in (("k", k_bufs), ("v", v_bufs)):
            got = tuple(bufs[0].shape[1:])
            if got != want:
                raise ValueError(f"KV pool {name} rows are [H, D] = {list(got)}, calibration has {list(want)}")
        self.k_buffers: list[torch.Tensor] = k_bufs  # L x [num_slots, H, D]
        self.v_buffers: list[torch.Tensor] = v_bufs
        self.dtype = k_bufs[0].dtype
        self.device = k_bufs[0].device
        self.num_slots = k_bufs[0].shape[0]

    @property
    def buffers(self) -> list[torch.Tensor]:
        """All ``2L`` buffers: K of every layer, then V of every layer."""
        return [*self.k_buffers, *self.v_buffers]

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at ``slots`` (``[T]`` int64): two ``[L, T, H, D]`` tensors in the pool dtype."""
        idx = slots.to(self.device)
        k = torch.stack([buf.index_select(0, idx) for buf in self.k_buffers])  # [L, T, H, D]
        v = torch.stack([buf.index_select(0, idx) for buf in self.v_buffers])  # [L, T, H, D]
        return k, v

    def scatter(self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``[L, T, H, D]`` K and V into the pool rows at ``slots`` (``[T]`` int64)."""
        if k.dtype != self.dtype or v.dtype != self.dtype:
            raise ValueError(f"decoded K/V dtype {k.dtype}/{v.dtype} does not match the KV pool's {self.dtype}")
        idx = slots.to(self.device)
        for layer, (kb, vb) in enumerate(zip(self.k_buffers, self.v_buffers, strict=True)):
            kb.index_copy_(0, idx, k[layer].to(self.device))
            vb.index_copy_(0, idx, v[layer].to(self.device))

    def copy(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy every layer's K/V rows from slots ``src`` to slots ``dst`` (both ``[T]`` int64)."""
        s, d = src.to(self.device), dst.to(self.device)
        for buf in self.buffers:
            buf.index_copy_(0, d, buf.index_select(0, s))
