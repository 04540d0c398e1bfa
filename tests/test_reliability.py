"""Fail-safe behaviour of KVTCRadixCache: corrupted blobs among good ones, and a CI-sized soak run."""

from __future__ import annotations

import dataclasses
import random

import torch

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import BankKV, Driver, build_cache, build_pool
from kvtc_sglang.workloads.soak import SoakConfig, soak


def _flip_tail(blob: torch.Tensor) -> None:
    blob[-3] ^= 0x10


def _damage(cache, node, damage=_flip_tail) -> None:
    """Rewrite a compressed node's stored blob after ``damage`` changed it in place."""
    entry = cache.io.entries[node]
    blob = cache.store.get(entry.handle)
    damage(blob)
    cache.store.free(entry.handle)
    cache.io.entries[node] = dataclasses.replace(entry, handle=cache.store.put(blob))


def test_one_bad_node_among_many_good_ones(codec, artifact, kv_bank):
    bank = BankKV(*kv_bank)
    _, allocator = build_pool(artifact.spec, 4096, 1)
    cache = build_cache(allocator, 1, codec, KVTCCacheConfig(
        calibration="t", window_tokens=8, idle_seconds=0.0, encode="inline"))
    drv = Driver(cache, bank)
    shared = list(range(200))
    branches = {b: shared + [10_000 * (b + 1) + i for i in range(150)] for b in range(4)}
    for seq in branches.values():
        drv.finish(drv.start(seq))
    cache.compress_idle(now=float("inf"))
    by_start = {}
    for node, entry in cache.io.entries.items():
        by_start.setdefault(entry.start, []).append(node)
    assert len(by_start[200]) == 4  # one compressed node per branch after the shared part
    bad = next(n for n in by_start[200] if n.key.token_ids[0] == 20_000)  # branch 1
    _damage(cache, bad)
    for b, seq in branches.items():
        n, k, v = drv.read_prefix(seq)
        assert n == (200 if b == 1 else 350), (b, n)
        assert torch.equal(k[:, :4], bank.k[:, :4])
        assert ((k.float() - bank.k[:, :n].float()).norm() / bank.k[:, :n].float().norm()) < 0.2
    assert cache.stats.checksum_failures == 1 and cache.stats.restores == 4  # shared part + 3 good branches
    check_invariants(cache)


def test_soak_ci_sized(codec, kv_bank):
    """1500 scheduler-like steps, 4 concurrent lock holders, paged pool under pressure (the long run is
    ``python -m kvtc_sglang.workloads.soak``)."""
    out = soak(codec, BankKV(*kv_bank), SoakConfig(steps=1500, pool_tokens=2048, page_size=16, check_every=25))
    assert out["compressions"] > 50 and out["restores"] > 10 and out["checksum_failures"] == 0
    assert out["invariant_checks"] > 50 and out["worst_rel_err"] < 0.5


def test_fuzzed_blob_in_the_cache_never_writes_outside_its_slots(codec, artifact, kv_bank):
    """40 seeded rounds of random byte damage to a stored blob: the match stops before the node (a miss,
    never wrong KV), and no pool row outside the slots the restore allocated changes (compared bitwise:
    store rows hold blob bytes, which read as bf16 include NaNs)."""
    rng = random.Random(7)
    bank = BankKV(*kv_bank)
    _, allocator = build_pool(artifact.spec, 1024, 1)
    cache = build_cache(allocator, 1, codec, KVTCCacheConfig(
        calibration="t", window_tokens=8, idle_seconds=0.0, encode="inline"))
    drv = Driver(cache, bank)
    seq = list(range(120))
    for _ in range(40):
        drv.finish(drv.start(seq))
        cache.compress_idle(now=float("inf"))
        [node] = cache.io.entries

        def flip(blob):
            for _ in range(rng.randint(1, 4)):
                blob[rng.randrange(blob.numel())] ^= rng.randint(1, 255)

        _damage(cache, node, flip)
        free_before = set(allocator.get_all_free_pages().tolist())
        before = [b.view(torch.uint8).clone() for b in drv.kv.buffers]
        n, k, _ = drv.read_prefix(seq)
        taken = free_before - set(allocator.get_all_free_pages().tolist())  # slots the restore kept
        keep = torch.ones(before[0].shape[0], dtype=torch.bool)
        keep[list(taken)] = False
        assert all(torch.equal(a[keep], b.view(torch.uint8)[keep]) for a, b in zip(before, drv.kv.buffers, strict=True))
        assert n == 4 and torch.equal(k, bank.k[:, :4])
        check_invariants(cache)
    assert cache.stats.checksum_failures == 40
