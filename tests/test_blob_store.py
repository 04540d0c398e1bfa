"""BlobStore round trips: odd sizes, fragmentation, page borrowing and return, on a fake allocator (CPU)."""

from __future__ import annotations

import random

import pytest
import torch

from kvtc_sglang.cache.store import BlobHandle, BlobStore


class FakeAllocator:
    """SGLang's allocator interface over a shuffled free list (so a page's slots are scattered rows)."""

    def __init__(self, num_slots: int, page_size: int, seed: int) -> None:
        pages = list(range(num_slots // page_size))
        random.Random(seed).shuffle(pages)
        self.page_size = page_size
        self.free_pages = [torch.arange(p * page_size, (p + 1) * page_size) for p in pages]
        self.num_slots = num_slots

    def available_size(self) -> int:
        return len(self.free_pages) * self.page_size

    def alloc(self, n: int) -> torch.Tensor | None:
        if n != self.page_size:
            raise ValueError(f"fake allocator hands out whole pages of {self.page_size}, asked for {n}")
        return self.free_pages.pop() if self.free_pages else None

    def free(self, slots: torch.Tensor) -> None:
        self.free_pages.append(slots.clone())

    def free_segment(self, slots: torch.Tensor, *, start_pos: int) -> None:  # SGLang's sync-free page free
        if start_pos % self.page_size or slots.numel() != self.page_size:
            raise ValueError(f"a segment free of whole pages at a page start, got {slots.numel()} at {start_pos}")
        self.free(slots)


def _store(num_slots=64, page_size=4, max_slots=32, seed=0):
    buffers = [torch.zeros(num_slots, 2, 8, dtype=torch.bfloat16) for _ in range(6)]  # 3 layers, rows of 32 bytes
    alloc = FakeAllocator(num_slots, page_size, seed)
    return BlobStore(buffers, alloc, page_size, max_slots), alloc, buffers


def _blob(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_put_get_free_odd_sizes_with_fragmentation(page_size):
    store, alloc, _ = _store(num_slots=128, page_size=page_size, max_slots=64, seed=page_size)
    rng = random.Random(page_size)
    live: dict[int, tuple[BlobHandle, torch.Tensor]] = {}
    for step in range(300):
        if live and (rng.random() < 0.45 or store.room_bytes < 4096):
            key = rng.choice(sorted(live))
            store.free(live.pop(key)[0])
        else:
            n = rng.choice([0, 1, 31, 32, 33, 97, 255, 1000, rng.randrange(1, 3000)])
            blob = _blob(n, step)
            handle = store.put(blob)
            if handle is None:
                assert store.pages_needed(n) > 0  # refused only when it really needed pages it cannot borrow
                continue
            live[step] = (handle, blob)
        for handle, blob in live.values():
            got = store.get(handle)
            assert got.dtype == torch.uint8 and torch.equal(got, blob)
        held = store.held_slots()
        assert held.numel() == store.num_slots == store.num_pages * page_size
        assert held.numel() + alloc.available_size() == 128  # borrowed + free = the pool
    for handle, _ in list(live.values()):
        store.free(handle)
    assert store.num_pages == 0 and alloc.available_size() == 128  # every page went back


def test_blob_spanning_pages_and_buffers_lands_in_borrowed_rows_only():
    store, alloc, buffers = _store(num_slots=64, page_size=4, max_slots=32)
    blob = _blob(7 * 32 * 6 + 5, 1)  # more than a page of blocks (4 slots x 6 buffers x 32 bytes)
    handle = store.put(blob)
    assert handle is not None and store.num_pages == 2
    assert torch.equal(store.get(handle), blob)
    borrowed = store.held_slots()
    untouched = torch.ones(64, dtype=torch.bool)
    untouched[borrowed] = False
    for b in buffers:
        assert not b[untouched].view(torch.uint8).any()  # rows of slots the store does not hold stay zero


def test_full_store_refuses_and_double_free_raises():
    store, _, _ = _store(num_slots=64, page_size=4, max_slots=8)
    assert store.put(_blob(store.capacity_bytes + 1, 2)) is None
    handle = store.put(_blob(store.capacity_bytes, 3))
    assert handle is not None and store.room_bytes == 0
    assert store.put(_blob(1, 4)) is None
    store.free(handle)
    with pytest.raises(RuntimeError, match="double free"):
        store.free(handle)


def test_reading_a_returned_page_raises():
    store, _, _ = _store()
    handle = store.put(_blob(40, 5))
    assert handle is not None
    store.free(handle)  # the page was the blob's only one: it goes back to the allocator
    with pytest.raises(RuntimeError, match="not held"):
        store.get(handle)


def test_refuses_non_byte_blobs():
    store, _, _ = _store()
    with pytest.raises(ValueError, match="1-D uint8"):
        store.put(torch.zeros(4, dtype=torch.int32))


def test_reserved_blocks_keep_two_ranks_stores_equal_for_different_blob_sizes():
    """Two tensor-parallel ranks store blobs of different sizes for the same nodes; each reserves the larger of
    the two, so their blocks and pages (what the tree decides on) stay equal while each gets its own bytes."""
    (s0, _, _), (s1, _, _) = _store(num_slots=128, max_slots=64, seed=1), _store(num_slots=128, max_slots=64, seed=2)
    rng = random.Random(7)
    live = []
    for step in range(200):
        if live and rng.random() < 0.4:
            (h0, _), (h1, _) = live.pop(rng.randrange(len(live)))
            s0.free(h0)
            s1.free(h1)
        else:
            a, b = _blob(rng.randrange(1, 900), 2 * step), _blob(rng.randrange(1, 900), 2 * step + 1)
            reserve = max(a.numel(), b.numel())
            h0, h1 = s0.put(a, reserve), s1.put(b, reserve)
            assert (h0 is None) == (h1 is None)
            if h0 is None:
                continue
            assert torch.equal(h0.blocks, h1.blocks) and (h0.nbytes, h1.nbytes) == (a.numel(), b.numel())
            live.append(((h0, a), (h1, b)))
        assert (s0.num_pages, s0.free_bytes) == (s1.num_pages, s1.free_bytes)
        for (h0, a), (h1, b) in live:
            assert torch.equal(s0.get(h0), a) and torch.equal(s1.get(h1), b)
    with pytest.raises(ValueError, match="reserve_bytes must be >= 0"):
        s0.put(_blob(4, 0), -1)


def lowest_unused_page_ref(store: BlobStore) -> int:
    """Reference: the lowest page number the store does not hold (a scan of its page list)."""
    return next(p for p, slots in enumerate(store._page_slots) if slots is None)


def test_pages_are_taken_lowest_first_after_any_release_order():
    """The unused-page heap picks what a scan for the lowest unused page would, whatever order pages return in."""
    store, _, _ = _store(num_slots=256, page_size=2, max_slots=128)
    rng = random.Random(7)
    live: list[BlobHandle] = []
    for step in range(400):
        if live and (rng.random() < 0.45 or store.num_pages == store.max_pages):
            store.free(live.pop(rng.randrange(len(live))))
            continue
        before = {p for p, s in enumerate(store._page_slots) if s is not None}
        expected = lowest_unused_page_ref(store) if store.num_pages < store.max_pages else None
        blob = torch.randint(0, 256, (rng.randint(1, 3 * store.blocks_per_page * store.row_bytes),), dtype=torch.uint8)
        handle = store.put(blob)
        if handle is None:
            continue
        live.append(handle)
        new = {p for p, s in enumerate(store._page_slots) if s is not None} - before
        if new:
            assert min(new) == expected, step
        assert torch.equal(store.get(handle), blob)
    for handle in live:
        store.free(handle)
    assert store.num_pages == 0 and lowest_unused_page_ref(store) == 0
    store.clear()
    assert lowest_unused_page_ref(store) == 0


@pytest.mark.parametrize("page_size", [1, 16])
def test_a_borrowed_page_owns_exactly_its_slots_on_sglangs_allocator(page_size):
    """At page size 1 SGLang's ``alloc`` returns a view into its whole free list; a page the store holds must own
    its ``8 * P`` bytes, not keep that list (800 KB at 100k slots) alive outside SGLang's memory budget."""
    from types import SimpleNamespace

    from kvtc_sglang.workloads.replay import build_pool

    spec = SimpleNamespace(num_layers=1, num_kv_heads=1, head_dim=8, dtype="bfloat16")  # what build_pool reads
    pool, allocator = build_pool(spec, 100_000, page_size)
    store = BlobStore([*pool.k_buffer, *pool.v_buffer], allocator, page_size, 64 * page_size)
    handles = [store.put(_blob(100, seed), 0) for seed in range(3)]
    held = [s for s in store._page_slots if s is not None]
    assert held and all(h is not None for h in handles)
    for slots in held:
        assert slots.untyped_storage().nbytes() == 8 * page_size, slots.untyped_storage().nbytes()
    assert torch.equal(store.get(handles[1]), _blob(100, 1))
