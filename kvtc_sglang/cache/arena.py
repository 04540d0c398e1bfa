"""Compressed-blob storage carved out of the KV pool itself.

At start-up the cache takes ``n`` slots from SGLang's allocator and never hands them back to requests. Each
of those slots owns one row in each of the pool's ``2L`` K/V buffers (``H * D * itemsize`` bytes); the arena
uses those rows as fixed-size blocks for compressed blobs. The compressed store therefore costs no memory
beyond the KV pool the server already allocated: its budget is exactly ``n`` tokens of uncompressed KV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BlobHandle:
    """Where one blob lives: arena block ids (ascending) and its length in bytes."""

    blocks: torch.Tensor  # [num_blocks] int64, CPU
    nbytes: int


class BlobArena:
    """Block allocator over the pool rows of reserved slots.

    Args:
        buffers: the pool's ``2L`` buffers, each ``[num_slots, H, D]``, contiguous.
        slots: ``[n]`` int64 reserved slot indices (owned by the arena while it lives).
    """

    def __init__(self, buffers: list[torch.Tensor], slots: torch.Tensor) -> None:
        if not buffers:
            raise ValueError("BlobArena needs at least one buffer")
        for b in buffers:
            if not b.is_contiguous():
                raise ValueError("BlobArena buffers must be contiguous")
        self._rows = [b.view(torch.uint8).view(b.shape[0], -1) for b in buffers]  # 2L x [num_slots, row_bytes]
        self.row_bytes = self._rows[0].shape[1]
        self.slots = slots.to(torch.int64)
        self.device = buffers[0].device
        self._slots_dev = self.slots.to(self.device)
        self.num_blocks = len(buffers) * self.slots.numel()
        self._free = list(range(self.num_blocks - 1, -1, -1))  # a stack: pop() gives the lowest id first
        self._used = torch.zeros(self.num_blocks, dtype=torch.bool)

    @property
    def capacity_bytes(self) -> int:
        return self.num_blocks * self.row_bytes

    @property
    def free_bytes(self) -> int:
        return len(self._free) * self.row_bytes

    def blocks_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.row_bytes))

    def can_fit(self, nbytes: int) -> bool:
        return self.blocks_for(nbytes) <= len(self._free)

    def _by_buffer(self, blocks: torch.Tensor):
        n = self.slots.numel()
        buf_ids = blocks // n
        for b in torch.unique(buf_ids).tolist():
            sel = (buf_ids == b).nonzero().squeeze(1)  # positions in the blob, ascending
            yield b, sel, self._slots_dev[(blocks[sel] % n).to(self.device)]

    def put(self, blob: torch.Tensor) -> BlobHandle | None:
        """Store ``blob`` (``[nbytes]`` uint8); ``None`` when the arena lacks free blocks."""
        if blob.dtype != torch.uint8 or blob.dim() != 1:
            raise ValueError(f"blob must be a 1-D uint8 tensor, got {blob.dtype} with shape {list(blob.shape)}")
        nbytes = blob.numel()
        k = self.blocks_for(nbytes)
        if k > len(self._free):
            return None
        blocks = torch.tensor(sorted(self._free.pop() for _ in range(k)), dtype=torch.int64)
        self._used[blocks] = True
        padded = torch.zeros(k * self.row_bytes, dtype=torch.uint8, device=self.device)
        padded[:nbytes] = blob.to(self.device)
        rows = padded.view(k, self.row_bytes)  # [k, row_bytes]
        for b, sel, slot_rows in self._by_buffer(blocks):
            self._rows[b].index_copy_(0, slot_rows, rows[sel.to(self.device)])
        return BlobHandle(blocks, nbytes)

    def get(self, handle: BlobHandle) -> torch.Tensor:
        """The stored bytes, ``[nbytes]`` uint8 on the arena's device (a copy)."""
        k = handle.blocks.numel()
        out = torch.empty(k, self.row_bytes, dtype=torch.uint8, device=self.device)
        for b, sel, slot_rows in self._by_buffer(handle.blocks):
            out[sel.to(self.device)] = self._rows[b].index_select(0, slot_rows)
        return out.view(-1)[: handle.nbytes]

    def free(self, handle: BlobHandle) -> None:
        if not bool(self._used[handle.blocks].all()):
            raise RuntimeError(f"arena double free: {int((~self._used[handle.blocks]).sum())} blocks already free")
        self._used[handle.blocks] = False
        self._free.extend(reversed(handle.blocks.tolist()))

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)
