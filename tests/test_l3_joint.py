"""Joint encoding with the L3 tier (``cache/l3_joint.py``) on the real SGLang pool, allocator and RadixCache (CPU)
with the real model's K/V and the directory backend: three sessions read the same file after different histories
on one cache; its chunk objects hold the residual blobs as joint segments that name their reference, written once
as an object of its own. Another cache (a replica, or the same server after a restart: an empty tree and book)
fetches a session's chunks, then the reference they name, and restores the session through them.

Reference first: a cache without joint encoding cannot use those chunks (a miss, not wrong KV); a damaged
reference object cuts the chunks at the first that names it.
"""

from __future__ import annotations

import json

import pytest
from conftest import rel_err
from test_joint_cache import FUTURE, ModelKV, joint, sessions  # noqa: F401  (fixtures)
from test_l3_tier import Req, prefetch

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.cache.factory import build_l3
from kvtc_sglang.cache.l3_objects import JOINT, unpack_joint, unpack_segments
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import Driver, build_cache, build_pool

CHUNK = 64


def make(codec, artifact, joint_codec, directory, *, with_joint: bool = True):  # noqa: F811
    _, allocator = build_pool(artifact.spec, 4096, 1)
    config = KVTCCacheConfig(calibration="unused-in-tests", encode="inline", window_tokens=128, l3="directory",
                             joint_calibration="in-test" if with_joint else "", joint_min_tokens=128,
                             host_bytes=256 << 20, l3_config=json.dumps({"path": str(directory), "chunk_tokens": CHUNK,
                                                                        "prefetch_timeout_s": 10}))  # fmt: skip
    cache = build_cache(allocator, 1, codec, config)
    if with_joint:
        cache.enable_joint(joint_codec)
    cache.l3 = build_l3(cache, config, artifact.spec, "smollm2", tp_size=1, tp_rank=0)
    return cache


@pytest.fixture(scope="module")
def written(codec, artifact, joint, lm, sessions, tmp_path_factory):  # noqa: F811, PLR0917
    """The directory one joint cache wrote through (write-through) after the three sessions."""
    directory = tmp_path_factory.mktemp("l3_joint")
    cache = make(codec, artifact, joint, directory)
    drv = Driver(cache, ModelKV(lm))
    for seq in sessions[0]:
        drv.finish(drv.start(seq))
        cache.compress_idle(now=FUTURE)
    assert cache.l3.client.flush(20.0)
    cache.scheduler_tick([])
    check_invariants(cache)
    return directory, cache


def test_chunks_name_one_reference_written_once(written):
    directory, cache = written
    s = cache.stats
    (ref,) = cache.io.joint.refs.values()
    assert s.joint_references_made == 1 and s.l3_references_written == 1 and ref.key is not None
    assert any(p.name == ref.key for p in directory.rglob("*"))
    # The residuals were cut at chunk boundaries: each is a blob of one chunk, and the chunks that blobs cover
    # whole (not the ones the 128-token windows keep on the device) hold them as joint segments naming the one
    # reference, over consecutive spans of it.
    assert s.joint_residual_blobs >= 4
    joint_segments = [seg for p in directory.rglob("kvtc-*") if p.name != ref.key for seg in _segments(p)
                      if seg.kind == JOINT]  # fmt: skip
    names = [unpack_joint(seg.data)[0] for seg in joint_segments]
    assert len(names) >= 4 and {n.key for n in names} == {ref.key}
    assert all(n.hi - n.lo == seg.hi - seg.lo and n.num_tokens == ref.header.num_tokens
               for n, seg in zip(names, joint_segments, strict=True))  # fmt: skip


def _segments(path):
    from kvtc_sglang.tiers.frame import unpack_object

    data = path.read_bytes()
    lo = 0
    for lo in range(0, 4096, CHUNK):  # the object's start is in its frame; find it by trying (test only)
        try:
            payload = unpack_object(data, key=path.name, digest=path.name.split("-")[1], start=lo, num_tokens=CHUNK,
                                    secret=None)  # fmt: skip
            return unpack_segments(payload, lo, lo + CHUNK)
        except ValueError:
            continue
    raise AssertionError(f"{path.name}: no chunk start fits")


def test_another_cache_restores_a_residual_session_through_the_fetched_reference(  # noqa: PLR0917
        codec, artifact, joint, lm, sessions, written, tmp_path):  # noqa: F811
    directory, _ = written
    seqs, _ = sessions
    src = ModelKV(lm)
    reader = make(codec, artifact, joint, directory)
    assert prefetch(reader, Req("r3", [*seqs[2], 7]))
    s = reader.stats
    assert s.joint_references_fetched == 1 and s.l3_rejected == 0, s
    assert s.l3_hit_tokens >= len(seqs[2]) - 128 - CHUNK  # every chunk its blobs covered whole
    n, k, v = Driver(reader, src).read_prefix([*seqs[2], 7])
    assert n >= len(seqs[2]) - 128 - CHUNK and s.joint_restored_tokens > 0
    k_ref, v_ref = src.kv(seqs[2], 0)
    assert rel_err(k, k_ref[:, :n]) < 0.35 and rel_err(v, v_ref[:, :n]) < 0.5
    assert s.checksum_failures == s.restore_failures == 0
    check_invariants(reader)
    # The second session's chunks name the same reference: the book holds its key, nothing is fetched again.
    assert prefetch(reader, Req("r2", [*seqs[1], 7]))
    assert s.joint_references_fetched == 1 and s.joint_references == 1
    n2, k2, _ = Driver(reader, src).read_prefix([*seqs[1], 7])
    k_ref2, _ = src.kv(seqs[1], 0)
    assert n2 >= len(seqs[1]) - 128 - CHUNK and rel_err(k2, k_ref2[:, :n2]) < 0.35
    check_invariants(reader)


def test_without_joint_encoding_the_chunks_are_a_miss(codec, artifact, joint, sessions, written):  # noqa: F811
    directory, _ = written
    seqs, _ = sessions
    plain = make(codec, artifact, joint, directory, with_joint=False)
    assert prefetch(plain, Req("p3", [*seqs[2], 7]))
    assert plain.stats.l3_rejected >= 1  # the first chunk with a joint segment, and everything after it
    assert plain.stats.l3_hit_tokens < len(seqs[2]) - 128 - CHUNK
    check_invariants(plain)


def test_a_damaged_reference_cuts_the_chunks_that_name_it(codec, artifact, joint, lm, sessions, written, tmp_path):  # noqa: PLR0917, F811
    directory, cache = written
    seqs, _ = sessions
    copy = tmp_path / "l3"
    for p in directory.rglob("kvtc-*"):
        (copy / p.parent.name).mkdir(parents=True, exist_ok=True)
        (copy / p.parent.name / p.name).write_bytes(p.read_bytes())
    (ref,) = cache.io.joint.refs.values()
    (damaged,) = [p for p in copy.rglob("*") if p.name == ref.key]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x5A
    damaged.write_bytes(bytes(data))
    reader = make(codec, artifact, joint, copy)
    assert prefetch(reader, Req("d3", [*seqs[2], 7]))
    s = reader.stats
    assert s.l3_rejected == 1 and s.joint_references_fetched == 0
    # The chunks before the first that names the reference are grafted; nothing from that one on.
    assert 0 < s.l3_hit_tokens < len(seqs[2]) - 128 - CHUNK
    assert all(e.joint is None for e in reader.io.entries.values()) and not reader.io.joint.refs
    n, k, _ = Driver(reader, ModelKV(lm)).read_prefix([*seqs[2], 7])
    k_ref, _ = ModelKV(lm).kv(seqs[2], 0)
    assert n == s.l3_hit_tokens and rel_err(k, k_ref[:, :n]) < 0.35
    check_invariants(reader)


def test_a_reference_neither_held_nor_fetched_ends_the_graft():
    """A chunk's reference the book held when the chunks came back (so it was not fetched) but freed since, with
    its last dependant: the graft stops there (a miss), rather than failing."""
    from test_joint_cache import _book

    from kvtc_sglang.cache.l3_joint import L3References
    from kvtc_sglang.cache.l3_objects import RefName
    from kvtc_sglang.tiers.keys import KeyScheme

    refs = L3References(_book([]), None, KeyScheme(CHUNK, "0" * 16), None)
    pinned: list[int] = []
    link = refs.linker(None, {}, pinned)
    assert link(None, RefName(f"kvtc-{'0' * 16}-{'1' * 64}", 0, 256, 0, CHUNK), 0) is None and pinned == []


def test_write_back_writes_the_reference_before_its_last_dependant_goes(codec, artifact, joint, lm, sessions,  # noqa: PLR0917, F811
                                                                         tmp_path):
    """``write_policy: write_back``: nothing is written while the sessions are resident; when every node is dropped
    (the reference is freed with its last dependant), the chunks and the reference they name are written first, and
    another cache restores a session through them."""
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    seqs, _ = sessions
    directory = tmp_path / "l3"
    cfg = json.dumps({"path": str(directory), "chunk_tokens": CHUNK, "prefetch_timeout_s": 10,
                      "write_policy": "write_back"})  # fmt: skip
    _, allocator = build_pool(artifact.spec, 4096, 1)
    config = KVTCCacheConfig(calibration="unused-in-tests", encode="inline", window_tokens=128, l3="directory",
                             joint_calibration="in-test", joint_min_tokens=128, host_bytes=256 << 20, l3_config=cfg)
    writer = build_cache(allocator, 1, codec, config)
    writer.enable_joint(joint)
    writer.l3 = build_l3(writer, config, artifact.spec, "smollm2", tp_size=1, tp_rank=0)
    drv = Driver(writer, ModelKV(lm))
    for seq in seqs:
        drv.finish(drv.start(seq))
        writer.compress_idle(now=FUTURE)
    assert writer.l3.client.flush(20.0)
    writer.scheduler_tick([])
    s = writer.stats
    assert s.joint_references == 1 and s.l3_put_objects == 0  # resident: nothing written
    writer.evict(EvictParams(num_tokens=10**6))
    assert writer.l3.client.flush(20.0)
    writer.scheduler_tick([])
    assert s.joint_references == 0 and s.l3_references_written == 1 and s.l3_put_objects >= 5, s
    check_invariants(writer)
    reader = make(codec, artifact, joint, directory)
    assert prefetch(reader, Req("wb3", [*seqs[2], 7]))
    assert reader.stats.joint_references_fetched == 1 and reader.stats.l3_rejected == 0
    n, k, _ = Driver(reader, ModelKV(lm)).read_prefix([*seqs[2], 7])
    k_ref, _ = ModelKV(lm).kv(seqs[2], 0)
    assert n >= len(seqs[2]) - 128 - CHUNK and reader.stats.joint_restored_tokens > 0
    assert rel_err(k, k_ref[:, :n]) < 0.35
    check_invariants(reader)
