"""The stream rules on a real GPU, without SGLang (it does not travel to the lent machine's image): kvtc's
controller, blob store and codec on CUDA pool buffers, a forward stream and a schedule stream of our own.

Reference first: the rows a restore must leave are ``codec.decode(blob)`` (computed after a full synchronize).
A "forward" that sleeps and then writes garbage into slots already given to the restore stands for SGLang's
overlap scheduler (a batch in flight still writing freed slots):

- the restore's rows end as the reference: the load stream waited on the forward (rule 1);
- a read of those rows issued on the forward stream after the restore sees them: the forward waited (rule 3);
- ``restore`` and ``put`` return while the forward still sleeps: the scheduler thread never waited on it;
- their row writes run under ``torch.cuda.set_sync_debug_mode("error")``: no host sync at all.
"""

from __future__ import annotations

from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch

from kvtc_sglang.cache.controller import KVTCController
from kvtc_sglang.cache.kv_io import PoolKV
from kvtc_sglang.cache.stats import KVTCStats
from kvtc_sglang.cache.store import BlobStore
from kvtc_sglang.cache.streams import CudaStreamOps

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SLEEP_CYCLES = 2_000_000_000  # ~1 s of torch.cuda._sleep: far longer than a restore's host work
N, P = 4096, 16  # pool slots, page size


class PageAllocator:
    """SGLang's allocator interface (``alloc``/``free``/``free_segment``/``available_size``) over device pages."""

    def __init__(self, device: torch.device) -> None:
        self.free_pages = list(torch.arange(N, device=device).view(-1, P).unbind(0))[::-1]
        self.free_group = None

    def available_size(self) -> int:
        return len(self.free_pages) * P

    def alloc(self, n: int) -> torch.Tensor | None:
        if n % P or n > self.available_size():
            return None
        return torch.cat([self.free_pages.pop() for _ in range(n // P)])

    def free(self, slots: torch.Tensor) -> None:
        self.free_pages += list(slots.view(-1, P).unbind(0))

    def free_segment(self, slots: torch.Tensor, *, start_pos: int) -> None:
        self.free(slots)


@contextmanager
def no_sync():
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _cuda_pool(kv_bank):
    """The bank on CUDA ``[L, 1024, H, D]`` bf16 each, a zeroed pool of ``N`` slots, its page allocator and store."""
    dev = torch.device("cuda")
    k_bank, v_bank = (x.to(dev) for x in kv_bank)
    num_l, _, heads, dim = k_bank.shape
    pool = SimpleNamespace(
        k_buffer=[torch.zeros(N, heads, dim, dtype=k_bank.dtype, device=dev) for _ in range(num_l)],
        v_buffer=[torch.zeros(N, heads, dim, dtype=k_bank.dtype, device=dev) for _ in range(num_l)],
    )
    kv, allocator = PoolKV(pool, num_l, heads, dim), PageAllocator(dev)
    return k_bank, v_bank, kv, allocator, BlobStore(kv.buffers, allocator, P, 1024)


def _no_sync(obj, name: str, monkeypatch) -> None:
    fn = getattr(obj, name)

    def wrapped(*args, **kwargs):
        with no_sync():
            return fn(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapped)


def test_restore_and_put_on_cuda_follow_the_stream_rules(codec, kv_bank, monkeypatch):
    k_bank, v_bank, kv, allocator, store = _cuda_pool(kv_bank)
    ctl = KVTCController(codec, kv, KVTCStats(), background=False, stream_ops=CudaStreamOps())
    forward, schedule = torch.cuda.Stream(), torch.cuda.Stream()
    ctl.bind_forward_stream(forward)
    num_t = 256
    with torch.cuda.stream(schedule):  # the scheduler thread's current stream, as under the overlap scheduler
        a = allocator.alloc(num_t)
        kv.scatter(a, k_bank[:, :num_t], v_bank[:, :num_t])
        job = ctl.encode_now([(None, a, 0)])
        (blob, header), = job.results
        handle = ctl.put(store, blob)
        torch.cuda.synchronize()
        ref_k, ref_v, _ = codec.decode(blob)  # the reference: [L, T, H, D]
        b = allocator.alloc(num_t)  # slots a batch in flight still writes
        with torch.cuda.stream(forward):
            forward.wait_stream(schedule)  # as SGLang's forward waits on its schedule stream
            torch.cuda._sleep(SLEEP_CYCLES)
            for buf in kv.buffers:
                buf[b] = 7.0
            slept = torch.cuda.Event()
            slept.record(forward)
        _no_sync(codec, "write_rows_many", monkeypatch)
        _no_sync(store, "write", monkeypatch)
        ctl.restore(lambda: [store.get(handle)], [header], [(b, torch.arange(num_t))], ready=[handle.ready])
        assert not slept.query(), "restore waited for the forward in flight"
        second = ctl.put(store, blob)  # a put while the forward sleeps: no host wait either
        assert second is not None and not slept.query(), "put waited for the forward in flight"
        with torch.cuda.stream(forward):  # the next batch reads the restored pages
            seen = kv.buffers[0][b].clone()
        torch.cuda.synchronize()
    k, v = kv.gather(b)
    assert torch.equal(k, ref_k) and torch.equal(v, ref_v), "the forward's late writes won over the restore"
    assert torch.equal(seen, ref_k[0]), "the next batch read the pages before the restore wrote them"
    assert torch.equal(store.get(second), blob)


def test_a_blob_moved_to_host_memory_is_fenced_against_the_reuse_of_its_pages(codec, kv_bank):
    """The host tier on CUDA (``cache/placement.py``): the copy to pinned memory runs on the host stream after
    the blob's put, the store page it read is freed at once, and a batch that writes that page must wait for
    the copy; a restore from host memory then writes the rows the blob decodes to."""
    from kvtc_sglang.cache.placement import BlobPlacement

    k_bank, v_bank, kv, allocator, store = _cuda_pool(kv_bank)
    stats = KVTCStats()
    ctl = KVTCController(codec, kv, stats, background=False, stream_ops=CudaStreamOps())
    placement = BlobPlacement(store, ctl.fences, stats, host_bytes=64 << 20)
    forward, schedule = torch.cuda.Stream(), torch.cuda.Stream()
    ctl.bind_forward_stream(forward)
    num_t = 256
    with torch.cuda.stream(schedule):
        a = allocator.alloc(num_t)
        kv.scatter(a, k_bank[:, :num_t], v_bank[:, :num_t])
        (blob, header), = ctl.encode_now([(None, a, 0)]).results
        torch.cuda.synchronize()
        ref_k, ref_v, _ = codec.decode(blob)
        with torch.cuda.stream(forward):
            forward.wait_stream(schedule)
            torch.cuda._sleep(SLEEP_CYCLES)  # a batch in flight: the put (after its fence) and the copy wait
        handle = ctl.put(store, blob)
        pages_before = allocator.available_size()
        moved = placement.demote(handle)
        assert moved is not None and allocator.available_size() > pages_before  # its pages went back at once
        reused = allocator.alloc(allocator.available_size() - pages_before)
        with torch.cuda.stream(forward):  # the next batch writes the freed pages
            for buf in kv.buffers:
                buf[reused] = 7.0
        torch.cuda.synchronize()
    assert torch.equal(moved.host.to(blob.device), blob), "the batch overwrote the page before the copy read it"
    b = allocator.alloc(num_t)
    with torch.cuda.stream(schedule):
        ctl.restore(lambda: [placement.fetch(moved)], [header], [(b, torch.arange(num_t))], ready=[moved.ready])
        torch.cuda.synchronize()
    k, v = kv.gather(b)
    assert torch.equal(k, ref_k) and torch.equal(v, ref_v)


def test_a_blob_copied_out_for_l3_is_fenced_against_the_reuse_of_its_pages(codec, kv_bank):
    """The L3's copy of a blob out of the store on CUDA (``cache/l3_writes.py``; under write-back the blob's node
    is dropped right after it, its pages freed): the copy runs on the host stream after the blob's put, and a
    batch that writes the freed page must wait for it."""
    from types import SimpleNamespace

    from kvtc_sglang.cache.l3_writes import L3Writer
    from kvtc_sglang.cache.placement import BlobPlacement

    k_bank, v_bank, kv, allocator, store = _cuda_pool(kv_bank)
    stats = KVTCStats()
    ctl = KVTCController(codec, kv, stats, background=False, stream_ops=CudaStreamOps())
    placement = BlobPlacement(store, ctl.fences, stats)
    writer = object.__new__(L3Writer)  # only the copy-out path: the cache's placement and fences
    writer.cache = SimpleNamespace(placement=placement, ctl=ctl, store=store)
    forward, schedule = torch.cuda.Stream(), torch.cuda.Stream()
    ctl.bind_forward_stream(forward)
    num_t = 256
    with torch.cuda.stream(schedule):
        a = allocator.alloc(num_t)
        kv.scatter(a, k_bank[:, :num_t], v_bank[:, :num_t])
        (blob, _header), = ctl.encode_now([(None, a, 0)]).results
        torch.cuda.synchronize()
        with torch.cuda.stream(forward):
            forward.wait_stream(schedule)
            torch.cuda._sleep(SLEEP_CYCLES)  # a batch in flight: the put (after its fence) and the copy wait
        handle = ctl.put(store, blob)
        (host,), copied = writer._blob_to_host(handle)
        pages_before = allocator.available_size()
        store.free(handle)  # the drop: its pages go back at once
        assert allocator.available_size() > pages_before
        reused = allocator.alloc(allocator.available_size() - pages_before)
        with torch.cuda.stream(forward):  # the next batch writes the freed pages
            for buf in kv.buffers:
                buf[reused] = 7.0
        torch.cuda.synchronize()
    assert copied is not None and host.is_pinned()
    assert torch.equal(host.to(blob.device), blob), "the batch overwrote the page before the L3 copy read it"
