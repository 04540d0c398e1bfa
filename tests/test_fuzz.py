"""Fuzzing the blob decoder and the calibration loader with hypothesis (10,500 generated inputs in all).

Reference first: a valid blob decodes to exactly what ``codec.decode`` gives for the unmodified bytes;
anything else must raise the documented exception (``BlobError`` / ``ArtifactError``) and nothing else.
Runs are derandomized, so CI sees the same inputs every time.
"""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtc_sglang.codec import ArtifactError, BlobError, load_artifact
from kvtc_sglang.codec.blob import build_header

FUZZ = settings(max_examples=3000, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def blob(codec, real_kv) -> bytes:
    k, v, pos = real_kv
    return codec.encode(k[:, :6], v[:, :6], pos[:6] + 100).numpy().tobytes()


@pytest.fixture(scope="module")
def decoded(codec, blob):
    return codec.decode(blob)


def _decode_or_blob_error(codec, data: bytes, reference) -> None:
    """``BlobError``, or a decode equal to ``reference``; with ``reference=None`` (a re-signed header that
    is well-formed by construction), a decode whose shapes agree with its own header."""
    try:
        k, v, pos = codec.decode(data)
    except BlobError:
        return
    if reference is None:
        s = codec.spec
        assert k.shape == v.shape == (s.num_layers, pos.numel(), s.num_kv_heads, s.head_dim)
        assert torch.isfinite(k.float()).all() and torch.isfinite(v.float()).all()
        return
    assert all(torch.equal(a, b) for a, b in zip((k, v, pos), reference, strict=True))


def test_fuzz_mutated_blobs(codec, blob, decoded):
    @FUZZ
    @given(st.data())
    def run(data):
        raw = bytearray(blob)
        for _ in range(data.draw(st.integers(0, 6))):
            op = data.draw(st.sampled_from(["flip", "set", "cut", "insert", "delete"]))
            if not raw:
                break
            i = data.draw(st.integers(0, len(raw) - 1))
            if op == "flip":
                raw[i] ^= 1 << data.draw(st.integers(0, 7))
            elif op == "set":
                raw[i] = data.draw(st.integers(0, 255))
            elif op == "cut":
                del raw[i:]
            elif op == "insert":
                raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
            else:
                del raw[i : i + data.draw(st.integers(1, 16))]
        _decode_or_blob_error(codec, bytes(raw), decoded)

    run()


def test_fuzz_random_bytes(codec, blob, decoded):
    @FUZZ
    @given(st.binary(max_size=512), st.booleans())
    def run(tail, keep_magic):
        _decode_or_blob_error(codec, (blob[:4] if keep_magic else b"") + tail, decoded)

    run()


def test_fuzz_well_formed_headers_with_hostile_fields(codec, blob, decoded):
    """Headers with valid CRCs but hostile shapes, positions, dtypes and chunk tables."""
    head = codec.read_header(blob)
    body = blob[head.data_offset :]
    s = codec.spec

    @FUZZ
    @given(
        st.tuples(st.integers(1, 64), st.integers(1, 16), st.integers(1, 256)),
        st.sampled_from([torch.float16, torch.bfloat16, torch.float32]),
        st.lists(st.integers(-(2**31), 2**31 - 1), min_size=0, max_size=12),
        st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 2**24), st.integers(0, 2**32 - 1)), max_size=3),
        st.booleans(),
    )
    def run(shape, dtype, positions, chunks, real_chunks):
        if real_chunks:
            chunks = [(len(body), head.chunks[0][1], zlib.crc32(body))]
            shape = (s.num_layers, s.num_kv_heads, s.head_dim)
        try:
            header = build_header(codec.artifact_id, shape, dtype, torch.tensor(positions, dtype=torch.int64), chunks)
        except (ValueError, OverflowError):
            return  # the writer refuses it; nothing to decode
        _decode_or_blob_error(codec, header + body, None)

    run()


def _mutate_json(value, data, depth: int = 0):
    """Drop keys, change types, or replace leaves somewhere in a JSON document."""
    if isinstance(value, dict) and value and depth < 4:
        key = data.draw(st.sampled_from(sorted(value)))
        op = data.draw(st.sampled_from(["drop", "descend", "retype"]))
        out = dict(value)
        if op == "drop":
            del out[key]
        elif op == "descend":
            out[key] = _mutate_json(value[key], data, depth + 1)
        else:
            out[key] = data.draw(st.sampled_from([None, -1, 0, 1e308, "x", [], {}, True, [1, 2]]))
        return out
    if isinstance(value, list) and value and depth < 4:
        i = data.draw(st.integers(0, len(value) - 1))
        return [*value[:i], _mutate_json(value[i], data, depth + 1), *value[i + 1 :]]
    return data.draw(st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=8)))


def test_fuzz_calibration_loader(artifact_path, tmp_path_factory):
    """Mutated headers (JSON structure and raw bytes) must give ``ArtifactError``; no code ever runs."""
    raw = artifact_path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    outer = json.loads(raw[8 : 8 + n])
    kvtc = json.loads(outer["__metadata__"]["kvtc"])
    tensors_part = raw[8 + n : 8 + n + 4096]  # truncated: a header that survives is refused when tensors are read
    folder = tmp_path_factory.mktemp("fuzz")

    @settings(max_examples=1500, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def run(data):
        mode = data.draw(st.sampled_from(["kvtc-json", "outer-json", "bytes"]))
        if mode == "kvtc-json":
            meta = dict(outer["__metadata__"], kvtc=json.dumps(_mutate_json(kvtc, data)))
            head = json.dumps(dict(outer, __metadata__=meta)).encode()
        elif mode == "outer-json":
            head = json.dumps(_mutate_json(outer, data)).encode()
        else:
            head = bytearray(raw[8 : 8 + n])
            for _ in range(data.draw(st.integers(1, 4))):
                head[data.draw(st.integers(0, len(head) - 1))] = data.draw(st.integers(0, 255))
            head = bytes(head)
        path = folder / "fuzzed.kvtc.safetensors"
        path.write_bytes(len(head).to_bytes(8, "little") + head + tensors_part)
        with pytest.raises(ArtifactError):  # the tensors are truncated: nothing may load, whatever the header
            load_artifact(path)

    run()


def test_truncated_artifact_is_refused_and_the_whole_one_loads(artifact_path, tmp_path):
    """The loader fuzz's premise, unmutated: cut tensors are refused; the same header with all of them loads."""
    raw = artifact_path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    cut = tmp_path / "cut.kvtc.safetensors"
    for keep in (0, 4096, len(raw) - 8 - n - 1):
        cut.write_bytes(raw[: 8 + n + keep])
        with pytest.raises(ArtifactError):
            load_artifact(cut)
    whole = tmp_path / "whole.kvtc.safetensors"
    whole.write_bytes(raw)
    assert load_artifact(whole).artifact_id == load_artifact(artifact_path).artifact_id
