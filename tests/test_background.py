"""Background compression and the latent gaps of issue 18, on the real SGLang pool, allocators and radix
cache with real SmolLM2 K/V (the replay driver plays the scheduler: a tick before every admission).

Reference first: what was written into the pool is what a restore must give back, within the codec's own
round-trip error; uncompressed tokens exactly.
"""

from __future__ import annotations

import argparse
import threading
import time

import pytest
import torch

pytest.importorskip("sglang")  # the cache imports SGLang; the GPU image lacks it unless it travels

from conftest import rel_err
from sglang.srt.mem_cache.base_prefix_cache import EvictParams

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.launch import plugin
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import Driver, build_cache, build_pool

pytestmark = pytest.mark.model




def make(codec, slots: int, ps: int = 1, **cfg):
    _, allocator = build_pool(codec.spec, slots, ps)
    defaults = {"window_tokens": 16, "idle_watermark": 0.0, "ready_fraction": 1.0, "encode": "background"}
    config = KVTCCacheConfig(calibration="t", **{**defaults, **cfg})
    return build_cache(allocator, ps, codec, config)


class Gate:
    """Holds the background encoder inside its codec call until opened (encodes on other threads pass)."""

    def __init__(self, monkeypatch, codec) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        real = codec.encode_rows_many

        def gated(*args, **kwargs):
            if not threading.current_thread().name.startswith("kvtc-encode"):
                return real(*args, **kwargs)  # evict's inline encode, on the scheduler thread
            self.entered.set()
            if not self.opened.wait(60):
                raise RuntimeError("test gate never opened")
            return real(*args, **kwargs)

        monkeypatch.setattr(codec, "encode_rows_many", gated)

    def open_later(self, seconds: float) -> None:
        threading.Timer(seconds, self.opened.set).start()


@pytest.mark.parametrize("ps", [1, 16])
def test_encodes_run_in_the_background_and_commit_at_a_later_tick(codec, bank, codec_err, monkeypatch, ps):
    cache = make(codec, 2048, ps)
    drv = Driver(cache, bank)
    seq = list(range(300))
    drv.finish(drv.start(seq))
    gate = Gate(monkeypatch, codec)
    cache.scheduler_tick()  # queues the encode and returns: the worker is held inside the codec
    assert gate.entered.wait(30) and cache.ctl.pending == 1 and not cache.io.retained
    cache.scheduler_tick()  # nothing finished: nothing committed, nothing waited for
    assert cache.ctl.pending == 1 and cache.stats.encodes == 0 and cache.stats.encoder_waits == 0
    gate.opened.set()
    cache.ctl.wait()
    cache.scheduler_tick()
    assert cache.stats.encodes == 1 and len(cache.io.retained) == 1 and cache.stats.compressions == 0
    assert cache.stats.worker_seconds > 0 and cache.stats.scheduler_codec_seconds == 0  # off the scheduler
    [(node, entry)] = cache.io.retained.items()
    before, seconds = cache.token_to_kv_pool_allocator.available_size(), cache.stats.compress_seconds
    assert cache.evict(EvictParams(num_tokens=entry.num_tokens)).num_tokens_evicted == entry.num_tokens
    assert cache.stats.compressions == 1 and cache.stats.compress_seconds == seconds  # evict encoded nothing
    assert cache.token_to_kv_pool_allocator.available_size() == before + entry.num_tokens
    check_invariants(cache)
    n, k, v = drv.read_prefix([*seq, 7])
    assert n == 300 // ps * ps and cache.stats.restores == 1
    sink_end = entry.start
    assert torch.equal(k[:, :sink_end], bank.k[:, :sink_end])
    assert rel_err(k, bank.k[:, :n]) <= 1.2 * codec_err and rel_err(v, bank.v[:, :n]) <= 1.2 * codec_err
    check_invariants(cache)
    cache.ctl.shutdown()


def test_evict_encodes_inline_when_the_encoder_lags_and_waits_only_when_nothing_else_is_left(
    codec, bank, monkeypatch
):
    cache = make(codec, 1024)
    drv = Driver(cache, bank)
    old, new = list(range(300)), list(range(5000, 5300))
    drv.finish(drv.start(old))
    gate = Gate(monkeypatch, codec)
    cache.scheduler_tick()  # the encoder holds the old sequence's node
    assert gate.entered.wait(30)
    drv.finish(drv.start(new))  # its tick finds a job pending: nothing more is queued
    pending = set(cache._pending)
    # Nothing is encoded but the held node: the new sequence is encoded on this thread and compressed, not
    # dropped (its KV stays cached); the held job is not waited for.
    freed = cache.evict(EvictParams(num_tokens=200)).num_tokens_evicted
    assert freed >= 200 and cache.stats.encoder_waits == 0 and all(n.parent is not None for n in pending)
    assert cache.stats.inline_encodes == 1 and cache.stats.compressions == 1 and cache.stats.dropped_tokens == 0
    assert cache.stats.scheduler_codec_seconds > 0
    gate.open_later(0.3)
    t0 = time.perf_counter()
    allocator = cache.token_to_kv_pool_allocator
    before, need = allocator.available_size(), cache.evictable_size()
    freed = cache.evict(EvictParams(num_tokens=need)).num_tokens_evicted  # only the held node
    assert time.perf_counter() - t0 >= 0.2 and cache.stats.encoder_waits == 1 and freed > 0
    # SGLang allocates right after evict: the blobs committed while waiting took pool pages, evict must
    # still have freed all it was asked for (else alloc fails although evictable_size() promised it).
    assert allocator.available_size() >= before + need, (allocator.available_size(), before, need)
    check_invariants(cache)
    cache.ctl.shutdown()


def test_a_running_request_is_encoded_ahead_and_freeable_the_moment_it_ends(codec, bank):
    """SGLang admits a waiting request at the tick after a running one ends: its KV must already be encoded
    then, or evict drops it. Locked (running) nodes are encoded, never freed while locked."""
    cache = make(codec, 2048, 16, encode="inline")
    drv = Driver(cache, bank)
    seq = list(range(600))
    run = drv.start(seq)  # locked for the whole test below
    cache.scheduler_tick()
    assert cache.stats.encodes >= 1 and cache.io.retained
    assert all(n.lock_ref > 0 for n in cache.io.retained)
    assert cache._free_encoded(None) == 0 and cache.stats.compressions == 0  # evict's first step: locked stays
    drv.finish(run)
    encoded = sum(e.num_tokens for e in cache.io.retained.values())
    freed = cache.evict(EvictParams(num_tokens=encoded)).num_tokens_evicted
    assert freed >= encoded and cache.stats.compressions >= 1 and cache.stats.dropped_tokens == 0
    assert cache.stats.encodes == 1  # freeing encoded nodes encodes nothing more
    assert drv.read_prefix([*seq, 7])[0] == 600 // 16 * 16
    check_invariants(cache)


def test_a_dropped_kept_blob_of_a_running_request_is_not_encoded_again_while_it_runs(codec, bank):
    """evict drops the kept blob of a locked node (no KV lost) for the store's pages; the tick must not
    encode that node again until its request ends (no encode-and-drop churn)."""
    cache = make(codec, 2048, encode="inline")
    drv = Driver(cache, bank)
    run = drv.start(list(range(500)))
    cache.scheduler_tick()
    assert cache.io.retained
    store_slots = cache.store.num_slots
    cache._shrink_store(store_slots, kept_only=True)  # what evict's ``kept_blobs`` step does
    assert not cache.io.retained and cache.store.num_slots < store_slots
    encodes = cache.stats.encodes
    for _ in range(3):
        cache.scheduler_tick()
    assert cache.stats.encodes == encodes
    drv.finish(run)
    cache.scheduler_tick()  # unlocked: encodable again
    assert cache.stats.encodes > encodes
    check_invariants(cache)


def test_an_encoded_node_whose_window_leaf_was_evicted_is_still_compressed(codec, bank):
    """The sequence's uncompressed tail (its window) is evicted as a device leaf; the encoded node above it
    is now the tail, yet its blob is there: evict frees its slots (no KV lost), it does not drop them."""
    cache = make(codec, 2048, window_tokens=64, encode="inline")
    drv = Driver(cache, bank)
    seq = list(range(400))
    drv.finish(drv.start(seq))
    cache.scheduler_tick()
    [(node, entry)] = cache.io.retained.items()
    tail = next(iter(node.children.values()))
    assert not tail.children and len(tail.key) == 64
    cache._evict_device_pass(len(tail.key), keep_compressed=True)  # SGLang's LRU drops the window leaf
    assert tail.parent is None and not node.children and node in cache.io.retained
    freed = cache.evict(EvictParams(num_tokens=entry.num_tokens)).num_tokens_evicted
    assert freed == entry.num_tokens and cache.stats.compressions == 1 and cache.stats.dropped_tokens == 0
    assert drv.read_prefix(seq)[0] == 400 - 64
    check_invariants(cache)


def test_a_node_changed_while_encoded_discards_its_blob(codec, bank, monkeypatch):
    """A split (a match ending inside the node) while the encoder reads it: the blob no longer fits the node,
    so the commit drops it; the rows were not freed under the encoder."""
    cache = make(codec, 2048)
    drv = Driver(cache, bank)
    seq = list(range(400))
    drv.finish(drv.start(seq))
    gate = Gate(monkeypatch, codec)
    cache.scheduler_tick()
    assert gate.entered.wait(30)
    drv.finish(drv.start([*seq[:200], 99_999]))  # splits the node being encoded at 200
    gate.opened.set()
    cache.ctl.wait()
    cache.scheduler_tick()
    assert cache.stats.discarded_encodes >= 1
    assert drv.read_prefix(seq)[0] == 400
    check_invariants(cache)
    cache.ctl.shutdown()


def test_reset_waits_for_the_encoder_and_forgets_every_candidate(codec, bank, monkeypatch):
    """Latent gap: ``reset`` left the old candidate list valid (and a job could outlive the tree)."""
    cache = make(codec, 1024, 16)
    drv = Driver(cache, bank)
    for i in range(2):
        drv.finish(drv.start([i, *range(1000 * (i + 1), 1000 * (i + 1) + 300)]))
    cache.ctl.wait()  # the first sequence's encode (queued by the second admission's tick) has finished
    gate = Gate(monkeypatch, codec)
    cache.scheduler_tick()  # commits it, queues the second sequence's: held
    assert gate.entered.wait(30) and len(cache.policy.candidates) > 0
    gate.open_later(0.2)
    cache.reset()  # what SGLang's flush_cache does, followed by allocator.clear()
    cache.token_to_kv_pool_allocator.clear()
    assert cache.ctl.pending == 0 and not cache._pending
    assert len(cache.policy.candidates) == 0 and len(cache.policy.encoded) == 0 and not cache.io.retained
    cache.scheduler_tick()  # no stale node is encoded or committed
    drv.finish(drv.start(list(range(100))))
    cache.ctl.wait()
    cache.scheduler_tick()
    check_invariants(cache)
    cache.ctl.shutdown()


def test_a_restore_that_raises_frees_its_slots_and_recomputes(codec, bank, monkeypatch):
    """Latent gap: only ``BlobError`` was caught, so a CUDA out-of-memory or nvCOMP error in a restore leaked
    the slots and killed the scheduler."""
    cache = make(codec, 2048, encode="inline")
    drv = Driver(cache, bank)
    seq = list(range(300))
    drv.finish(drv.start(seq))
    cache.compress_idle(now=float("inf"))
    assert cache.io.entries
    free_before = cache.token_to_kv_pool_allocator.available_size()

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(codec, "write_rows_many", oom)
    n, k, _ = drv.read_prefix(seq)
    assert n == 4 and torch.equal(k, bank.k[:, :4])  # the match stops before the node: recompute
    assert cache.stats.restore_failures == 1 and cache.stats.load_back_failures == 1 and cache.io.entries
    assert cache.token_to_kv_pool_allocator.available_size() == free_before  # nothing leaked
    check_invariants(cache)
    monkeypatch.undo()
    assert drv.read_prefix(seq)[0] == 300 and cache.stats.restores == 1


def test_one_codec_call_restores_every_compressed_node_of_a_request(codec, bank, codec_err, monkeypatch):
    cache = make(codec, 4096, encode="inline", min_tokens=16)
    drv = Driver(cache, bank)
    turns = [list(range(200)), list(range(400)), list(range(600))]  # a conversation, one node per turn
    for seq in turns:
        drv.finish(drv.start(seq))
        cache.compress_idle(now=float("inf"))
    assert len(cache.io.entries) >= 2
    calls = []
    restores = cache.stats.restores
    real = codec.write_rows_many

    def counted(payloads, *args, **kwargs):
        calls.append(len(payloads))
        return real(payloads, *args, **kwargs)

    monkeypatch.setattr(codec, "write_rows_many", counted)
    n, k, v = drv.read_prefix(turns[-1])
    assert n == 600 and calls == [cache.stats.restores - restores] and calls[0] >= 2
    assert rel_err(k, bank.k[:, :600]) <= 1.2 * codec_err and rel_err(v, bank.v[:, :600]) <= 1.2 * codec_err
    check_invariants(cache)


def _ns(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--radix-cache-backend", default=None)
    plugin.add_cli_args(None, parser)
    ns = parser.parse_args(["--kv-backend", "kvtc", "--kvtc-calibration", kw.pop("calibration")])
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"kvtc_window_tokens": 0, "disable_overlap_schedule": False}, "below one page"),
        ({"kvtc_window_tokens": 8, "page_size": 16, "disable_overlap_schedule": False}, "below one page"),
        ({"hicache_storage_backend": "file"}, "--hicache-storage-backend file"),
        ({"disaggregation_decode_retraction_backup": "host_pool"}, "host_pool"),
    ],
)
def test_settings_kvtc_cannot_serve_are_refused_by_name(artifact_path, settings, message):
    with pytest.raises(ValueError, match=message):
        plugin.config_from_namespace(_ns(calibration=str(artifact_path), **settings))


def test_a_window_below_a_page_is_fine_without_the_overlap_scheduler(artifact_path):
    ns = _ns(calibration=str(artifact_path), kvtc_window_tokens=0, disable_overlap_schedule=True)
    assert plugin.config_from_namespace(ns).window_tokens == 0


def test_verify_restores_catches_a_row_overwritten_during_a_restore(codec, bank, monkeypatch):
    """The debugging check the GPU race test relies on: a restore is compared with what its blob decoded to
    when it was made; a row written by anyone else meanwhile (a stream race) is counted."""
    cache = make(codec, 2048, encode="inline", verify_restores=True)
    drv = Driver(cache, bank)
    seq = list(range(300))
    drv.finish(drv.start(seq))
    cache.compress_idle(now=float("inf"))
    assert drv.read_prefix(seq)[0] == 300
    assert cache.stats.verified_restores == 1 and cache.stats.verify_failures == 0
    cache.compress_idle(now=float("inf"))  # compressed again (its kept blob: no encode)
    real = codec.write_rows_many

    def racing(payloads, headers, k_layers, v_layers, targets):
        real(payloads, headers, k_layers, v_layers, targets)
        k_layers[3][targets[0][0][5]] += 1.0  # another writer hits one restored row

    monkeypatch.setattr(codec, "write_rows_many", racing)
    assert drv.read_prefix(seq)[0] == 300
    assert cache.stats.verified_restores == 2 and cache.stats.verify_failures == 1


def test_verify_restores_catches_an_encode_that_read_rows_too_early(codec, bank, monkeypatch):
    """An encode that reads its rows before the forward has written them (a stream race; here it reads zeros)
    makes a blob that passes its CRCs and restores to exactly what it decodes to: only a reference made from
    the rows as the device holds them at commit catches it."""
    cache = make(codec, 2048, encode="inline", verify_restores=True)
    real = codec.encode_rows_many

    def too_early(k_layers, v_layers, segments):
        return real([torch.zeros_like(b) for b in k_layers], [torch.zeros_like(b) for b in v_layers], segments)

    monkeypatch.setattr(codec, "encode_rows_many", too_early)
    drv = Driver(cache, bank)
    seq = list(range(300))
    drv.finish(drv.start(seq))
    cache.compress_idle(now=float("inf"))
    assert drv.read_prefix(seq)[0] == 300
    assert cache.stats.checksum_failures == 0
    assert cache.stats.verified_restores == 1 and cache.stats.verify_failures == 1


def test_the_encoder_sleeps_after_a_flush(codec, bank):
    """An evict wakes the encoder for 500 ticks; ``/flush_cache`` (``reset``) empties the cache, so the next
    workload that fits must not pay for encodes the earlier one's pressure asked for."""
    cache = make(codec, 1024, idle_watermark=0.75, ready_fraction=0.9, encode="inline")
    drv = Driver(cache, bank)
    drv.finish(drv.start(list(range(300))))
    cache.evict(EvictParams(num_tokens=1))  # pressure: awake
    drv.finish(drv.start(list(range(1000, 1300))))
    cache.scheduler_tick()
    assert cache.stats.encodes >= 1  # awake although the pool is far from full
    cache.reset()
    cache.token_to_kv_pool_allocator.clear()
    encodes = cache.stats.encodes
    drv.finish(drv.start(list(range(2000, 2300))))
    for _ in range(3):
        cache.scheduler_tick()
    assert cache.stats.encodes == encodes and not cache.io.retained
    check_invariants(cache)
