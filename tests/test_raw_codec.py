"""The identity codec (kvtc_sglang/codec/raw.py, ``RawCodec``): the KVTCCodec interface the cache uses, with the
blob framing of kvtc_sglang/codec/blob.py and stored chunks. Bit-exact pool-row round trips (bf16, fp32; odd
sizes), the documented payload order, artifact ids that keep raw and KVTC blobs apart, and every defect raising
the ``BlobError`` subclass KVTCCodec raises, with ``blob_index`` set. Model-free: a tiny synthetic spec."""

from __future__ import annotations

import pytest
import torch
from conftest import paged_slots

from kvtc_sglang.codec import (
    BlobCalibrationMismatchError,
    BlobChecksumError,
    BlobError,
    BlobPositionsError,
    BlobTruncatedError,
    CalibrationArtifact,
    KVTCCodec,
    ModelSpec,
    RawCodec,
    RopeConfig,
    StreamCalibration,
)
from kvtc_sglang.codec.allocation import Allocation, Group
from kvtc_sglang.codec.blob import build_header, header_nbytes

LAYERS, HEADS, DIM = 3, 2, 8
PAGE = 16
SIZES = (1, 7, 97, 1031)
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _spec(dtype: str = "bfloat16", name: str = "tiny", tp_rank: int = 0, tp_size: int = 1) -> ModelSpec:
    heads = tuple(range(HEADS)) if tp_size > 1 else ()
    return ModelSpec(
        name, "LlamaForCausalLM", LAYERS, HEADS, DIM, dtype, RopeConfig(theta=1e4, rotary_dim=DIM),
        tp_rank=tp_rank, tp_size=tp_size, tp_heads=heads,
    )  # fmt: skip


def _pool(rows: int, dtype: torch.dtype, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer K and V buffers ``[rows, H, D]`` of random values (every bit pattern of the dtype's range)."""
    g = torch.Generator().manual_seed(seed)
    make = lambda: (torch.randn(rows, HEADS, DIM, generator=g) * 10).to(dtype)  # noqa: E731
    return [make() for _ in range(LAYERS)], [make() for _ in range(LAYERS)]


def _regions(sizes: tuple[int, ...], seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Paged source and target slots per segment, each in a region of its own: ``(sources, targets, rows)``."""
    sources, targets, base = [], [], 0
    for i, t in enumerate(sizes):
        span = (-(-t // PAGE) + 2) * PAGE
        sources.append(base + paged_slots(t, PAGE, span, seed + i))
        targets.append(base + span + paged_slots(t, PAGE, span, seed + 100 + i))
        base += 2 * span
    return sources, targets, base


def _tiny_kvtc(spec: ModelSpec) -> KVTCCodec:
    """A KVTC codec over a synthetic calibration of ``spec`` (orthonormal bases, int8 groups), torch kernels."""
    g = torch.Generator().manual_seed(1)
    f = spec.num_features
    alloc = Allocation(tuple(Group(s, 16, "int8") for s in range(0, f, 16)))

    def stream() -> StreamCalibration:
        basis, _ = torch.linalg.qr(torch.randn(f, f, generator=g))
        return StreamCalibration(torch.zeros(f), torch.ones(f), basis, torch.ones(f), torch.ones(f), alloc)

    return KVTCCodec(CalibrationArtifact(spec, stream(), stream(), target_ratio=2.0), kernels="torch")


def _flip(blob: torch.Tensor, at: int) -> torch.Tensor:
    out = blob.clone()
    out[at] ^= 0x10
    return out


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_pool_rows_round_trip_bit_exact(dtype):
    codec = RawCodec(_spec(dtype), chunk_bytes=4096)
    sources, targets, rows = _regions(SIZES, seed=3)
    k_layers, v_layers = _pool(rows, DTYPES[dtype])
    positions = [torch.arange(5, 5 + t) for t in SIZES]
    positions[2] = torch.randperm(200)[: SIZES[2]]  # explicit (non-contiguous) positions
    blobs = codec.encode_rows_many(k_layers, v_layers, list(zip(sources, positions, strict=True)))
    headers = [codec.read_header(b) for b in blobs]
    before_k, before_v = [b.clone() for b in k_layers], [b.clone() for b in v_layers]
    dests = list(zip(targets, positions, strict=True))
    payloads = codec.read_blobs(blobs, headers, dests, torch.device("cpu"))
    assert [torch.equal(k, k0) for k, k0 in zip(k_layers, before_k, strict=True)] == [True] * LAYERS  # untouched
    codec.write_rows_many(payloads, headers, k_layers, v_layers, dests)
    written = torch.cat(targets)
    for layers, before in ((k_layers, before_k), (v_layers, before_v)):
        for buf, old in zip(layers, before, strict=True):
            for src, dst in zip(sources, targets, strict=True):
                assert torch.equal(buf[dst], old[src])
            keep = torch.ones(rows, dtype=torch.bool)
            keep[written] = False
            assert torch.equal(buf[keep], old[keep])  # no other row changed
    for blob, header, t, pos in zip(blobs, headers, SIZES, positions, strict=True):
        assert header.num_tokens == t and header.dtype == DTYPES[dtype] and torch.equal(header.positions, pos)
        assert blob.numel() == header.data_offset + codec.payload_nbytes(t) <= codec.max_blob_nbytes(t)
    assert 0.99 < codec.payload_nbytes(SIZES[-1]) / blobs[-1].numel() < 1.0  # ~1x: the header is all that is added


def test_payload_is_k_then_v_in_pool_dtype_in_stored_chunks():
    codec = RawCodec(_spec("float32"), chunk_bytes=1000)
    k_layers, v_layers = _pool(256, torch.float32)
    slots = paged_slots(97, PAGE, 256, seed=7)
    [blob] = codec.encode_rows_many(k_layers, v_layers, [(slots, torch.arange(97))])
    header = codec.read_header(blob)
    k = torch.stack([b[slots] for b in k_layers])  # [L, T, H, D]
    v = torch.stack([b[slots] for b in v_layers])
    expect = torch.cat([k.reshape(-1), v.reshape(-1)]).view(torch.uint8)
    assert torch.equal(blob[header.data_offset :], expect)
    assert [c[0] for c in header.chunks] == [c[1] for c in header.chunks]  # stored: length in blob == raw length
    assert len(header.chunks) == -(-expect.numel() // 1000)
    assert torch.equal(codec.encode(k, v, torch.arange(97)), blob)  # encode of [L, T, H, D] gives the same blob
    k2, v2, pos = codec.decode(blob)
    assert torch.equal(k2, k) and torch.equal(v2, v) and torch.equal(pos, torch.arange(97))


def test_empty_segment_round_trips():
    codec = RawCodec(_spec())
    k = torch.zeros(LAYERS, 0, HEADS, DIM, dtype=torch.bfloat16)
    blob = codec.encode(k, k, torch.arange(0))
    k2, v2, pos = codec.decode(bytes(blob.numpy()))
    assert k2.shape == k.shape and v2.shape == k.shape and pos.numel() == 0


def test_artifact_ids_keep_raw_and_kvtc_blobs_apart():
    spec = _spec()
    raw, kvtc = RawCodec(spec), _tiny_kvtc(spec)
    assert raw.artifact_id.startswith(b"RAW") and len(raw.artifact_id) == 8
    assert raw.artifact_id != kvtc.artifact_id
    others = [_spec(name="other"), _spec("float32"), _spec(tp_rank=1, tp_size=2)]
    assert len({raw.artifact_id, *(RawCodec(s).artifact_id for s in others)}) == 4  # one id per spec
    k_layers, v_layers = _pool(64, torch.bfloat16)
    seg = [(torch.arange(10, 30), torch.arange(20))]
    [raw_blob] = raw.encode_rows_many(k_layers, v_layers, seg)
    [kvtc_blob] = kvtc.encode_rows_many(k_layers, v_layers, seg)
    with pytest.raises(BlobCalibrationMismatchError, match="calibration 524157"):
        kvtc.read_header(raw_blob)
    with pytest.raises(BlobCalibrationMismatchError, match=f"decoder holds {raw.artifact_id.hex()}"):
        raw.read_header(kvtc_blob)
    with pytest.raises(BlobCalibrationMismatchError) as err:
        kvtc.decode_rows_many([kvtc_blob, raw_blob], k_layers, v_layers, [seg[0], seg[0]])
    assert err.value.blob_index == 1
    with pytest.raises(BlobCalibrationMismatchError) as err:
        raw.decode(kvtc_blob)
    assert err.value.blob_index == 0
    with pytest.raises(BlobCalibrationMismatchError):
        RawCodec(others[0]).read_header(raw_blob)  # another model's raw codec


def _two_blobs(codec: RawCodec):
    k_layers, v_layers = _pool(256, torch.bfloat16)
    segs = [(paged_slots(t, PAGE, 128, seed=t), torch.arange(t)) for t in (7, 97)]
    blobs = codec.encode_rows_many(k_layers, v_layers, segs)
    dests = [(128 + paged_slots(t, PAGE, 128, seed=50 + t), pos) for (_, pos), t in zip(segs, (7, 97), strict=True)]
    return blobs, [codec.read_header(b) for b in blobs], dests, k_layers, v_layers


def test_payload_bit_flip_and_truncation_name_the_blob():
    codec = RawCodec(_spec(), chunk_bytes=1024)
    blobs, headers, dests, *_ = _two_blobs(codec)
    cpu = torch.device("cpu")
    flipped = _flip(blobs[1], blobs[1].numel() - 3)
    with pytest.raises(BlobChecksumError, match="CRC32 mismatch") as err:
        codec.read_blobs([blobs[0], flipped], headers, dests, cpu)
    assert err.value.blob_index == 1
    with pytest.raises(BlobChecksumError, match="header CRC32") as err:  # a flip in the header
        codec.decode(_flip(blobs[0], 30))
    assert err.value.blob_index == 0
    short = blobs[1][:-5]
    with pytest.raises(BlobTruncatedError, match=f"{short.numel()} bytes") as err:  # header kept from encode
        codec.read_blobs([blobs[0], short], headers, dests, cpu)
    assert err.value.blob_index == 1
    with pytest.raises(BlobTruncatedError, match="header and chunk table say"):
        codec.read_header(short)
    with pytest.raises(BlobTruncatedError, match="fixed header alone"):
        codec.read_header(blobs[0][:20])


def test_positions_and_destination_mismatches():
    codec = RawCodec(_spec())
    blobs, headers, dests, k_layers, v_layers = _two_blobs(codec)
    cpu = torch.device("cpu")
    moved = [dests[0], (dests[1][0], dests[1][1] + 1)]
    with pytest.raises(BlobPositionsError, match="blob position 0 at token 0 of 97, the destination has 1") as err:
        codec.read_blobs(blobs, headers, moved, cpu)
    assert err.value.blob_index == 1 and isinstance(err.value, BlobError)
    with pytest.raises(ValueError, match="blob holds 97 tokens, destination is 96 rows"):
        codec.read_blobs(blobs, headers, [dests[0], (dests[1][0][:-1], dests[1][1])], cpu)
    payloads = codec.read_blobs(blobs, headers, dests, cpu)
    with pytest.raises(ValueError, match="holds torch.bfloat16 tokens, the pool is torch.float32"):
        codec.write_rows_many(payloads, headers, [b.float() for b in k_layers], [b.float() for b in v_layers], dests)


def test_forged_chunk_tables_are_refused():
    """Well-formed headers (valid CRC) whose chunk table does not describe a raw payload."""
    spec = _spec()
    codec = RawCodec(spec)
    t = 4
    need = codec.payload_nbytes(t)
    shape = (LAYERS, HEADS, DIM)

    def blob(dtype: torch.dtype, chunks: list[tuple[int, int, int]]) -> torch.Tensor:
        head = build_header(codec.artifact_id, shape, dtype, torch.arange(t), chunks)
        return torch.frombuffer(bytearray(head + bytes(sum(c[0] for c in chunks))), dtype=torch.uint8)

    with pytest.raises(BlobChecksumError, match=f"chunk 0 is not stored: {need - 1} bytes in the blob, {need} raw"):
        codec.decode(blob(torch.bfloat16, [(need - 1, need, 0)]))
    with pytest.raises(BlobChecksumError, match=f"holds {need} bytes, 4 torch.float32 tokens need {2 * need}"):
        codec.decode(blob(torch.float32, [(need, need, 0)]))
    assert header_nbytes(t, 1, False) + need == blob(torch.bfloat16, [(need, need, 0)]).numel()


@pytest.mark.parametrize("ps", [1, 16])
def test_radix_cache_with_raw_codec_matches_vanilla_exactly(ps):
    """The drop-in: SGLang's pool and allocator, the KVTC radix cache storing raw blobs, restores bit-exact."""
    import random

    pytest.importorskip("sglang")
    from kvtc_sglang.cache.config import KVTCCacheConfig
    from kvtc_sglang.workloads.invariants import check_invariants
    from kvtc_sglang.workloads.replay import BankKV, Driver, build_cache, build_pool, random_workload

    spec = _spec()
    g = torch.Generator().manual_seed(5)
    bank = BankKV(*(torch.randn(LAYERS, 1024, HEADS, DIM, generator=g).to(torch.bfloat16) for _ in range(2)))
    rng = random.Random(99 + ps)
    vanilla = build_cache(build_pool(spec, 8192, ps)[1], ps)
    config = KVTCCacheConfig(
        calibration="unused", encode="inline", window_tokens=8, idle_seconds=0.0, min_tokens=16, verify_restores=ps > 1
    )  # verify: the restore path also checks each restore against encode + decode of the rows
    raw = build_cache(build_pool(spec, 8192, ps)[1], ps, RawCodec(spec, chunk_bytes=4096), config)
    dv, dr = Driver(vanilla, bank), Driver(raw, bank)
    running: list[tuple] = []
    for step, (seq, u) in enumerate(random_workload(rng, 500, 40, 300)):
        if u < 0.3:
            nv, kv_v, vv_v = dv.read_prefix(seq)
            nr, kv_r, vv_r = dr.read_prefix(seq)
            assert nv == nr and torch.equal(kv_r, kv_v) and torch.equal(vv_r, vv_v), f"step {step}"
        else:
            rv, rr = dv.start(seq), dr.start(seq)
            assert rv.matched == rr.matched, f"step {step}: vanilla matched {rv.matched}, raw {rr.matched}"
            running.append((rv, rr))
        while running and (len(running) > 4 or rng.random() < 0.5):
            rv, rr = running.pop(rng.randrange(len(running)))
            dv.finish(rv)
            dr.finish(rr)
        if step % 7 == 0:
            raw.compress_idle(now=1e9)
    assert raw.stats.compressions > 10 and raw.stats.restores > 3
    assert raw.stats.verify_failures == 0 and (raw.stats.verified_restores > 0) == (ps > 1)
    check_invariants(raw)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_pool_round_trip_and_bit_flip():
    """On a GPU: blobs stay on the device (CRCs computed there), restores bit-exact, a flip names its blob."""
    cuda = torch.device("cuda")
    codec = RawCodec(_spec(), chunk_bytes=4096)
    codec.prepare(cuda)
    sources, targets, rows = _regions(SIZES, seed=11)
    k_layers, v_layers = (
        [b.to(cuda) for b in layers] for layers in _pool(rows, torch.bfloat16)
    )  # fmt: skip
    positions = [torch.arange(t) for t in SIZES]
    blobs = codec.encode_rows_many(k_layers, v_layers, list(zip(sources, positions, strict=True)))
    assert all(b.device.type == "cuda" for b in blobs)
    headers = [codec.read_header(b) for b in blobs]
    dests = list(zip(targets, positions, strict=True))
    flipped = [*blobs[:2], _flip(blobs[2], blobs[2].numel() - 1), blobs[3]]
    with pytest.raises(BlobChecksumError) as err:
        codec.read_blobs(flipped, headers, dests, cuda)
    assert err.value.blob_index == 2
    payloads = codec.read_blobs(blobs, headers, dests, cuda)
    codec.write_rows_many(payloads, headers, k_layers, v_layers, dests)
    for buf in (*k_layers, *v_layers):
        for src, dst in zip(sources, targets, strict=True):
            assert torch.equal(buf[dst.to(cuda)], buf[src.to(cuda)])
