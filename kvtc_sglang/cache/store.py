"""Compressed-blob storage in KV-pool rows the store borrows from SGLang's allocator, page by page.

Each slot owns one row in each of the pool's ``2L`` K/V buffers (``H * D * itemsize`` bytes); the store uses
those rows as fixed-size blocks for blobs. It reserves nothing at start-up: when a blob needs room it takes
a free page (``P`` slots) from the allocator, up to ``max_slots``; when the last blob on a page is freed,
the page goes straight back. Lower pages are filled first, so pages at the top empty out and return.

Accounting (what SGLang's scheduler sees): borrowed slots are neither free nor locked; the cache reports
them as *evictable*, because dropping the blobs on them (compressed nodes are never locked) gives them
back. ``available + evictable + protected`` therefore still adds up to the pool, as SGLang's idle leak
check expects, and ``PrefillBudget`` may count them, as it counts evictable device tokens.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..devcopy import to_device


@dataclass(frozen=True)
class BlobHandle:
    """Where one blob lives: block ids (ascending; ``slot position * 2L + buffer``) and its length; ``ready``:
    an event after which its bytes are there (set by the controller on a GPU; ``None``: already).

    A blob in host memory (:mod:`~kvtc_sglang.cache.placement`) has no blocks and its bytes in ``host``
    (``[nbytes]`` uint8, pinned on a GPU server); ``charge``: the host bytes it counts against the host
    budget (its store blocks' size when it left the pool: equal on every tensor-parallel rank)."""

    blocks: torch.Tensor  # [num_blocks] int64, CPU; [0] for a blob in host memory
    nbytes: int
    ready: Any = None
    host: torch.Tensor | None = None  # [nbytes] uint8, CPU
    charge: int = 0

    @property
    def on_host(self) -> bool:
        return self.host is not None


@dataclass(frozen=True)
class PutPlan:
    """Blocks reserved for one blob (:meth:`BlobStore.reserve`), not written yet: ``rows`` per buffer used."""

    blocks: torch.Tensor  # [k] int64, CPU
    nbytes: int
    rows: list[tuple[int, torch.Tensor, torch.Tensor]]  # (buffer, positions in the blob [k_b], slots [k_b])


class BlobStore:
    """Block allocator over the pool rows of slots borrowed from ``allocator``.

    Args:
        buffers: the pool's ``2L`` buffers, each ``[num_slots, H, D]``, contiguous.
        allocator: SGLang's token/paged allocator of that pool (``alloc``/``free``/``available_size``).
        page_size: ``P``; the store borrows and returns whole pages.
        max_slots: most slots the store may hold at once (a multiple of ``P``).
    """

    def __init__(self, buffers: list[torch.Tensor], allocator, page_size: int, max_slots: int) -> None:
        if not buffers:
            raise ValueError("BlobStore needs at least one buffer")
        for b in buffers:
            if not b.is_contiguous():
                raise ValueError("BlobStore buffers must be contiguous")
        if max_slots < page_size or max_slots % page_size:
            raise ValueError(f"max_slots must be a positive multiple of page_size {page_size}, got {max_slots}")
        self._rows = [b.view(torch.uint8).view(b.shape[0], -1) for b in buffers]  # 2L x [num_slots, row_bytes]
        self.row_bytes = self._rows[0].shape[1]
        self.device = buffers[0].device
        self.allocator = allocator
        self.page_size = page_size
        self.max_pages = max_slots // page_size
        self.blocks_per_page = len(buffers) * page_size
        # [max_pages, P] slot of each block position, on the pool's device (filled from the allocator's own
        # tensor: no copy to the host); rows of pages not held are stale and never read (``_locate`` checks).
        self._page_table = torch.full((self.max_pages, page_size), -1, dtype=torch.int64, device=self.device)
        self._reset_pages()

    def _reset_pages(self) -> None:
        """No page held: every page number unused, no free block."""
        self._page_slots: list[torch.Tensor | None] = [None] * self.max_pages  # page -> [P] slots, as allocated
        # min-heap of page numbers not held: the lowest is taken next (a scan of ``_page_slots`` for ``None``
        # compared every held tensor with None, ~10 us each: 19 ms per page at 2,048 pages, BENCHMARKS session 12)
        self._unused_pages = list(range(self.max_pages))
        self._page_used = [0] * self.max_pages  # used blocks per page
        self._free: list[int] = []  # min-heap of free block ids on held pages
        self._free_set: set[int] = set()
        self.num_pages = 0

    # ----- sizes -----

    @property
    def num_slots(self) -> int:
        """Slots borrowed from the pool now."""
        return self.num_pages * self.page_size

    @property
    def free_bytes(self) -> int:
        """Bytes free on held pages (more may be borrowed)."""
        return len(self._free_set) * self.row_bytes

    def blocks_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.row_bytes))

    # ----- pages -----

    def _grow(self) -> bool:
        """Borrow one free page from the allocator; ``False`` at ``max_slots`` or when none is free."""
        if self.num_pages >= self.max_pages or self.allocator.available_size() < self.page_size:
            return False
        slots = self.allocator.alloc(self.page_size)
        if slots is None:
            return False
        page = heapq.heappop(self._unused_pages)  # lowest unused page number
        # a copy that owns its 8 * P bytes: at page size 1 ``alloc`` returns a view into the allocator's free
        # list, and ``.to(int64)`` of an int64 view is that view (it kept the whole list alive, page by page)
        held = slots.to(torch.int64, copy=True)
        self._page_slots[page] = held
        self._page_table[page] = held
        self.num_pages += 1
        first = page * self.blocks_per_page
        for block in range(first, first + self.blocks_per_page):
            heapq.heappush(self._free, block)
            self._free_set.add(block)
        return True

    def _release(self, page: int) -> None:
        slots = self._page_slots[page]
        if slots is None:
            raise RuntimeError(f"blob store page {page} is released twice")
        first = page * self.blocks_per_page
        self._free_set.difference_update(range(first, first + self.blocks_per_page))  # heap entries go lazily
        self._page_slots[page] = None
        heapq.heappush(self._unused_pages, page)
        self.num_pages -= 1
        if slots.is_cuda:  # made on the store stream, read now by the allocator's free on the caller's stream
            slots.record_stream(torch.cuda.current_stream(slots.device))
        self.allocator.free_segment(slots, start_pos=0)  # one whole page: sync-free

    def _pop_block(self) -> int:
        while True:
            block = heapq.heappop(self._free)
            if block in self._free_set:
                self._free_set.discard(block)
                return block

    def _locate(self, ids: np.ndarray) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(buffer, positions in the blob [k_b], slot rows [k_b])`` per buffer the blob's blocks ``ids`` (``[k]``
        int64, host) use, both on device.

        The blocks are grouped by buffer on the host (numpy: no torch op, nothing to wait for), the index tensors
        go to the device through pinned memory (no host wait), and one lookup in the device-side
        ``[max_pages, P]`` page table finds every block's slot. Nothing comes back to the host.
        """
        nbuf = len(self._rows)
        per_slot = ids // nbuf  # slot position = page * P + offset
        for page in np.unique(per_slot // self.page_size):
            if self._page_slots[page] is None:
                raise RuntimeError(f"blob store page {page} is not held (a block points into a returned page)")
        buf_ids = ids % nbuf
        order = np.argsort(buf_ids, kind="stable")  # positions in the blob, grouped by buffer, ascending
        where = to_device(torch.from_numpy(order), self.device)
        rows = self._page_table.view(-1)[to_device(torch.from_numpy(per_slot[order]), self.device)]  # [k] slots
        out, at = [], 0
        for b, n in enumerate(np.bincount(buf_ids, minlength=nbuf)):
            if n:
                out.append((b, where[at : at + n], rows[at : at + n]))
                at += n
        return out

    # ----- blobs -----

    def reserve(self, nbytes: int, reserve_bytes: int = 0) -> PutPlan | None:
        """Reserve blocks for a blob of ``nbytes`` in ``max(nbytes, reserve_bytes)`` bytes, borrowing pages as
        needed; ``None`` when no room can be borrowed. Reads the allocator's free list and the page table, writes
        no pool row (:meth:`write` does). Under tensor parallelism every rank reserves the largest rank's size,
        so the store's blocks and pages (what the tree decides on) are the same on every rank."""
        if reserve_bytes < 0:
            raise ValueError(f"reserve_bytes must be >= 0, got {reserve_bytes}")
        k = self.blocks_for(max(nbytes, reserve_bytes))
        while len(self._free_set) < k:
            if not self._grow():
                return None
        ids = sorted(self._pop_block() for _ in range(k))
        for block in ids:
            self._page_used[block // self.blocks_per_page] += 1
        blocks = np.asarray(ids, dtype=np.int64)
        return PutPlan(torch.from_numpy(blocks), nbytes, self._locate(blocks))

    def write(self, plan: PutPlan, blob: torch.Tensor) -> BlobHandle:
        """Write ``blob`` (``[plan.nbytes]`` uint8 on the store's device) into its reserved blocks: device copies
        only (no host sync)."""
        if blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() != plan.nbytes:
            raise ValueError(
                f"blob must be a 1-D uint8 tensor of {plan.nbytes} bytes, got {blob.dtype} {list(blob.shape)}"
            )
        k = plan.blocks.numel()
        padded = torch.zeros(k * self.row_bytes, dtype=torch.uint8, device=self.device)
        padded[: blob.numel()] = to_device(blob, self.device)
        rows = padded.view(k, self.row_bytes)  # [k, row_bytes]
        for b, sel, slot_rows in plan.rows:
            self._rows[b].index_copy_(0, slot_rows, rows[sel])
        return BlobHandle(plan.blocks, plan.nbytes)

    def put(self, blob: torch.Tensor, reserve_bytes: int = 0) -> BlobHandle | None:
        """Store ``blob`` (``[nbytes]`` uint8): :meth:`reserve` then :meth:`write`; ``None`` when no room."""
        if blob.dtype != torch.uint8 or blob.dim() != 1:
            raise ValueError(f"blob must be a 1-D uint8 tensor, got {blob.dtype} with shape {list(blob.shape)}")
        plan = self.reserve(blob.numel(), reserve_bytes)
        return None if plan is None else self.write(plan, blob)

    def get(self, handle: BlobHandle) -> torch.Tensor:
        """The stored bytes, ``[nbytes]`` uint8 on the store's device (a copy)."""
        out = torch.empty(handle.blocks.numel(), self.row_bytes, dtype=torch.uint8, device=self.device)
        for b, sel, slot_rows in self._locate(handle.blocks.numpy()):
            out[sel] = self._rows[b].index_select(0, slot_rows)
        return out.view(-1)[: handle.nbytes]

    def free(self, handle: BlobHandle) -> None:
        """Free the blob's blocks; a page left without blobs goes back to the allocator at once."""
        ids = handle.blocks.tolist()
        pages = {block // self.blocks_per_page for block in ids}
        if any(self._page_slots[p] is None for p in pages) or any(b in self._free_set for b in ids):
            raise RuntimeError(f"blob store double free of {len(ids)} blocks")
        for block in ids:
            page = block // self.blocks_per_page
            self._page_used[page] -= 1
            heapq.heappush(self._free, block)
            self._free_set.add(block)
        for page in sorted(pages):
            if self._page_used[page] == 0:
                self._release(page)

    def held_slots(self) -> torch.Tensor:
        """``[num_slots]`` int64 slots borrowed now (for accounting checks)."""
        held = [s for s in self._page_slots if s is not None]
        return torch.cat(held) if held else torch.empty(0, dtype=torch.int64)

    def clear(self) -> None:
        """Forget every page without freeing it (SGLang clears the allocator itself after ``reset``)."""
        self._reset_pages()

    def pages_needed(self, nbytes: int) -> int:
        """Pages the store would have to borrow to hold a blob of ``nbytes`` now."""
        short = self.blocks_for(nbytes) - len(self._free_set)
        return max(0, -(-short // self.blocks_per_page))

    @property
    def room_bytes(self) -> int:
        """Bytes the store could still hold: free blocks on held pages plus pages it may still borrow."""
        return self.free_bytes + (self.max_pages - self.num_pages) * self.blocks_per_page * self.row_bytes

    @property
    def capacity_bytes(self) -> int:
        """Bytes the store holds at its cap (``max_slots`` borrowed)."""
        return self.max_pages * self.blocks_per_page * self.row_bytes
