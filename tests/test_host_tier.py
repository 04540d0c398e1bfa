"""The host tier (``KVTCCacheConfig.host_bytes``) on the real SGLang pool, allocator and RadixCache (CPU), with
real SmolLM2 K/V.

Reference first: the same workload without a host tier drops the oldest compressed session when the store is
full (its tokens are recomputed); with one, that session's blob moves to host memory and its next match
restores it, within the codec's own error, through the same one-call restore.
"""

from __future__ import annotations

import torch
from conftest import rel_err

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import Driver, build_cache, build_pool

FUTURE = 1e9
SESSION_TOKENS = 300


def make(codec, artifact, **cfg):
    _, allocator = build_pool(artifact.spec, 2048, 1)
    config = KVTCCacheConfig(calibration="unused-in-tests", **{
        "encode": "inline", "window_tokens": 8, "store_fraction": 0.02, **cfg,  # store: 40 slots, ~2 blobs
    })
    return build_cache(allocator, 1, codec, config)


def sessions(n: int) -> list[list[int]]:
    return [[7000 + i] + list(range(i * 1000, i * 1000 + SESSION_TOKENS - 1)) for i in range(n)]


def compress_sessions(cache, bank, seqs) -> Driver:
    drv = Driver(cache, bank)
    for seq in seqs:
        drv.finish(drv.start(seq))
        cache.compress_idle(now=FUTURE)
        check_invariants(cache)
    return drv


def session_of(node, seqs: list[list[int]]) -> list[int]:
    """The session whose path holds ``node`` (the root's child on its path starts with the session's token)."""
    while node.parent.parent is not None:
        node = node.parent
    return next(seq for seq in seqs if seq[0] == node.key.token_ids[0])


def restored_tokens(drv: Driver, bank, seq: list[int], codec_err: float) -> int:
    """Match ``seq`` again; the KV read back must be the bank's (exact sinks and window, the rest within the
    codec's error). Returns the tokens matched."""
    n, k, v = drv.read_prefix([*seq, 5])
    ref_k, ref_v = bank.k[:, :n], bank.v[:, :n]
    assert torch.equal(k[:, :4], ref_k[:, :4])
    assert rel_err(k, ref_k) <= 1.2 * codec_err and rel_err(v, ref_v) <= 1.2 * codec_err
    return n


def test_without_a_host_tier_the_oldest_session_is_dropped(codec, artifact, bank, codec_err):
    cache = make(codec, artifact)
    seqs = sessions(4)
    drv = compress_sessions(cache, bank, seqs)
    assert cache.stats.dropped_tokens > 0 and cache.stats.host_demotions == 0
    assert restored_tokens(drv, bank, seqs[0], codec_err) == 4  # only the sinks: the rest is recomputed


def test_a_session_pushed_out_of_the_store_comes_back_from_host_memory(codec, artifact, bank, codec_err):
    cache = make(codec, artifact, host_bytes=64 << 20)
    seqs = sessions(4)
    drv = compress_sessions(cache, bank, seqs)
    s = cache.stats
    assert s.dropped_tokens == 0 and s.host_demotions >= 2 and s.host_resident_tokens >= 2 * (SESSION_TOKENS - 12)
    assert s.host_resident_bytes == cache.placement.host.used_bytes > 0
    on_host = [n for n, e in cache.io.entries.items() if e.handle.on_host]
    assert on_host and all(n.value is None for n in on_host)
    assert cache.store.num_slots <= cache.store_max_tokens
    assert restored_tokens(drv, bank, seqs[0], codec_err) == SESSION_TOKENS
    assert s.host_restores == 1 and s.host_restored_tokens == SESSION_TOKENS - 4 - 8
    check_invariants(cache)
    # The restored node keeps its host blob: going cold again frees its slots without an encode or a store page.
    seconds, pages = s.compress_seconds, cache.store.num_pages
    cache.compress_idle(now=FUTURE)
    assert s.compress_seconds == seconds and s.reused_blobs >= 1 and cache.store.num_pages == pages
    check_invariants(cache)


def test_a_full_host_tier_drops_its_least_recently_used_session(codec, artifact, bank, codec_err):
    probe = make(codec, artifact, host_bytes=64 << 20)
    compress_sessions(probe, bank, sessions(3))
    one = max(e.handle.charge for e in probe.io.entries.values() if e.handle.on_host)
    cache = make(codec, artifact, host_bytes=one + one // 2)  # room for one session's blob, not two
    seqs = sessions(5)
    drv = compress_sessions(cache, bank, seqs)
    s = cache.stats
    assert s.host_dropped_tokens > 0 and cache.placement.host.used_bytes <= one + one // 2
    assert s.host_resident_nodes == 1
    assert restored_tokens(drv, bank, seqs[0], codec_err) == 4  # the oldest left host memory: recomputed
    [host_node] = [n for n, e in cache.io.entries.items() if e.handle.on_host]
    assert restored_tokens(drv, bank, session_of(host_node, seqs), codec_err) == SESSION_TOKENS
    check_invariants(cache)


def test_a_damaged_host_blob_is_a_miss(codec, artifact, bank):
    cache = make(codec, artifact, host_bytes=64 << 20)
    seqs = sessions(4)
    drv = compress_sessions(cache, bank, seqs)
    node, entry = next((n, e) for n, e in cache.io.entries.items() if e.handle.on_host)
    entry.handle.host[entry.handle.nbytes // 2] ^= 0x40
    n, k, _ = drv.read_prefix(session_of(node, seqs))
    assert n == 4 and torch.equal(k, bank.k[:, :4])  # recompute, never wrong KV
    assert cache.stats.checksum_failures == 1 and node not in cache.io.entries
    assert cache.placement.host.used_bytes == sum(e.handle.charge for e in cache.io.entries.values())
    check_invariants(cache)


def test_host_bytes_is_checked():
    import pytest

    with pytest.raises(ValueError, match="host_bytes must be an integer >= 0"):
        KVTCCacheConfig(calibration="x", host_bytes=-1)


def test_a_demotion_copy_is_fenced(artifact):
    """On a GPU the copy to host memory runs on kvtc's host stream after the blob's put, and the store rows it
    read are freed at once: the streams that write rows (store, load) and the next batch must wait on it."""
    from stream_recorder import Log, RecordingOps

    from kvtc_sglang.cache.placement import BlobPlacement
    from kvtc_sglang.cache.stats import KVTCStats
    from kvtc_sglang.cache.store import BlobStore
    from kvtc_sglang.cache.streams import StreamFences

    pool, allocator = build_pool(artifact.spec, 256, 1)
    log = Log()
    ops = RecordingOps(log, overlap=True)
    fences = StreamFences(torch.device("cpu"), ops)
    fences.bind_forward_stream(ops.forward)
    buffers = [*pool.k_buffer, *pool.v_buffer]
    store = BlobStore(buffers, allocator, 1, 64)
    placement = BlobPlacement(store, fences, KVTCStats(), host_bytes=1 << 20)
    blob = torch.arange(3000, dtype=torch.int32).to(torch.uint8)
    with fences.enter("store", fences.issued()):
        handle = store.put(blob)
    put_done = fences.done("store")
    from dataclasses import replace

    moved = placement.demote(replace(handle, ready=put_done))
    assert moved is not None and torch.equal(moved.host, blob) and store.num_pages == 0
    host = ops.kvtc["host"]
    waits = [e for e in log.entries if e[0] == "wait"]
    assert any(e[1] is host and e[2] is put_done for e in waits), "the copy did not wait on the blob's put"
    copy_done = moved.ready
    assert copy_done is not None and copy_done.stream is host
    for s in (ops.kvtc["store"], ops.kvtc["load"], ops.forward):
        assert any(e[1] is s and e[2] is copy_done for e in waits), f"{s} does not wait on the copy"


def test_a_blob_the_store_cannot_take_starts_in_host_memory(artifact, bank):
    """Raw blobs (``RawCodec``, 1x) are larger than the whole 40-slot store: without a host tier the encode is
    wasted and the session stays uncompressed; with one, the blob is kept in host memory from the start and
    the session comes back from it bit for bit."""
    from kvtc_sglang.codec import RawCodec

    raw = RawCodec(artifact.spec)
    for host in (0, 64 << 20):
        cache = make(raw, artifact, host_bytes=host)
        seq = sessions(1)[0]
        drv = compress_sessions(cache, bank, [seq])
        s = cache.stats
        if not host:
            assert s.store_full_tokens > 0 and s.compressed_tokens == 0
            continue
        assert s.host_adopted == 1 and s.compressed_tokens == SESSION_TOKENS - 12 and s.host_resident_nodes == 1
        n, k, v = drv.read_prefix([*seq, 5])
        assert n == SESSION_TOKENS and s.host_restored_tokens == SESSION_TOKENS - 12
        assert torch.equal(k, bank.k[:, :n]) and torch.equal(v, bank.v[:, :n])  # raw: exact
        check_invariants(cache)
