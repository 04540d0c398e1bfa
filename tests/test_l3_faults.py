"""The L3 tier's faults against a real Mooncake master (started by the fixture), with the tree on SGLang's real
pool, allocator and RadixCache (CPU) and real SmolLM2 K/V: the master killed and restarted, damaged and foreign
objects written straight into the store. Each is a miss and a prefill, counted, never wrong KV, and no tick
waits on the network.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from mooncake_support import MooncakeMaster, mooncake_master, requires_mooncake  # noqa: F401
from test_l3_tier import CHUNK, SEQ, Req, write_session

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.cache.factory import build_l3
from kvtc_sglang.cache.l3_objects import KVTC, RAW, Segment, pack_segments, unpack_segments
from kvtc_sglang.codec import RawCodec
from kvtc_sglang.tiers.frame import pack_object, unpack_object
from kvtc_sglang.tiers.l3_mooncake import MooncakeBackend
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import Driver, build_cache, build_pool

pytestmark = requires_mooncake


def mooncake_cache(codec, artifact, master: MooncakeMaster, timeout_s: float = 1.0):
    _, allocator = build_pool(artifact.spec, 2048, 1)
    l3 = {"master_server_address": master.address, "chunk_tokens": CHUNK, "prefetch_timeout_s": timeout_s,
          "global_segment_size": "64mb", "local_buffer_size": "32mb"}  # fmt: skip
    config = KVTCCacheConfig(calibration="unused-in-tests", l3="mooncake", host_bytes=64 << 20, encode="inline",
                             window_tokens=8, l3_config=json.dumps(l3))  # fmt: skip
    cache = build_cache(allocator, 1, codec, config)
    cache.l3 = build_l3(cache, config, artifact.spec, "smollm2", tp_size=1, tp_rank=0)
    return cache


def timed_prefetch(cache, req: Req) -> tuple[list, float]:
    """``prefetch`` with the longest single tick it took (seconds)."""
    waiting, longest = [req], 0.0
    end = time.monotonic() + 30
    while time.monotonic() < end:
        t0 = time.perf_counter()
        cache.scheduler_tick(waiting)
        longest = max(longest, time.perf_counter() - t0)
        if waiting:
            break
        time.sleep(0.01)
    return waiting, longest


def test_a_dead_master_is_a_miss_and_never_stalls_a_tick(codec, artifact, bank, mooncake_master):  # noqa: F811
    reader = mooncake_cache(codec, artifact, mooncake_master)
    mooncake_master.kill()
    t0 = time.monotonic()
    waiting, longest = timed_prefetch(reader, Req("dead", [*SEQ, 5]))
    assert waiting and time.monotonic() - t0 < 1.0 + 2.0  # released by the 1 s deadline (or the error) at most
    assert longest < 0.5, f"a tick took {longest:.2f} s with the master dead"
    assert reader.stats.l3_hits == 0 and Driver(reader, bank).read_prefix(SEQ)[0] == 0
    # Writes with the master dead: queued or dropped, never waited for.
    writer = reader
    drv = Driver(writer, bank)
    drv.finish(drv.start([9100, *SEQ[1:]]))
    writer.compress_idle(now=1e9)
    assert writer.stats.l3_offered == 4
    mooncake_master.start()  # restarted on the same port: the clients reconnect; earlier objects are gone
    second = mooncake_cache(codec, artifact, mooncake_master, timeout_s=5.0)
    drv2 = Driver(second, bank)
    drv2.finish(drv2.start(SEQ))
    second.compress_idle(now=1e9)
    assert second.l3.client.flush(30.0)
    second.scheduler_tick([])
    assert second.stats.l3_put_objects == 4, vars(second.stats)
    third = mooncake_cache(codec, artifact, mooncake_master, timeout_s=5.0)
    waiting, _ = timed_prefetch(third, Req("alive", [*SEQ, 5]))
    assert waiting and third.stats.l3_hits == 5  # the sinks' rows raw, then 4 blobs
    assert Driver(third, bank).read_prefix(SEQ)[0] == 4 * CHUNK
    check_invariants(third)


@pytest.fixture
def model_parts(codec, artifact, bank):
    return codec, artifact, bank


def _damaged(damage: str, key: str, data: bytes, *, digest: str, raw: RawCodec, bank) -> bytes:
    """A damaged copy of a valid object of ``key``, as a faulty or hostile writer would put it."""
    if damage == "flip":
        out = bytearray(data)
        out[len(out) // 3] ^= 0x10
        return bytes(out)
    if damage == "truncate":
        return data[: len(data) // 2]
    if damage == "foreign_calibration":  # well-framed objects whose kvtc segments another codec made
        j = next(j for j in range(4) if _opens(data, key, digest, j))
        payload = unpack_object(data, key=key, digest=digest, start=j * CHUNK, num_tokens=CHUNK, secret=None)
        segments = [seg if seg.kind == RAW else Segment(KVTC, seg.lo, seg.hi, raw.encode(
            bank.k[:, seg.lo:seg.hi].contiguous(), bank.v[:, seg.lo:seg.hi].contiguous(),
            torch.arange(seg.lo, seg.hi)).numpy().tobytes()) for seg in unpack_segments(payload, j * CHUNK,
                                                                                      (j + 1) * CHUNK)]  # fmt: skip
        return pack_object(pack_segments(segments), key=key, digest=digest, start=j * CHUNK, num_tokens=CHUNK,
                           secret=None)  # fmt: skip
    return data  # unauthenticated: intact, but without the MAC the readers require


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign_calibration", "unauthenticated"])
def test_objects_written_straight_into_the_store_are_refused(model_parts, tmp_path, mooncake_master, damage):  # noqa: F811
    codec, artifact, bank = model_parts
    # Valid objects first (the directory tier of the same deployment: same keys), then damaged copies put
    # straight into Mooncake under the same keys.
    directory = tmp_path / "l3"
    source = write_session(codec, artifact, bank, directory)
    files = {p.name: p.read_bytes() for p in Path(directory).rglob("*") if p.is_file()}
    assert len(files) == 4
    digest, raw = source.l3.scheme.digest, RawCodec(artifact.spec)
    store = MooncakeBackend(mooncake_master.address, global_segment_bytes=64 << 20, local_buffer_bytes=32 << 20)
    try:
        for key, data in files.items():
            assert store.put(key, _damaged(damage, key, data, digest=digest, raw=raw, bank=bank))
        with pytest.MonkeyPatch.context() as mp:
            if damage == "unauthenticated":
                mp.setenv("KVTC_L3_SECRET", "fleet-secret")  # the readers require MACs; these objects have none
            reader = mooncake_cache(codec, artifact, mooncake_master, timeout_s=5.0)
        waiting, _ = timed_prefetch(reader, Req("r", [*SEQ, 5]))
        assert waiting and reader.stats.l3_rejected == 1 and reader.stats.l3_hits == 0
        n, _, _ = Driver(reader, bank).read_prefix(SEQ)
        assert n == 0 and reader.stats.restores == 0  # the request prefills: never wrong KV
        check_invariants(reader)
    finally:
        store.close()


def _opens(data: bytes, key: str, digest: str, j: int) -> bool:
    try:
        unpack_object(data, key=key, digest=digest, start=j * CHUNK, num_tokens=CHUNK, secret=None)
    except ValueError:
        return False
    return True
