"""Calibration artifact: versioned safetensors + JSON, verified on load, never pickled."""

from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch

from kvtc_sglang.codec import ArtifactError, load_artifact, read_header
from kvtc_sglang.codec.artifact import FORMAT_VERSION


def test_header_records_model_rope_allocation_and_corpus(artifact_path, lm):
    h = read_header(artifact_path)
    assert h["format_version"] == FORMAT_VERSION
    assert h["model"]["num_layers"] == 30 and h["model"]["num_kv_heads"] == 3 and h["model"]["head_dim"] == 64
    assert h["model"]["rope"]["theta"] == 100000.0
    assert h["target_ratio"] == 16.0
    assert h["bits_per_token"]["keys"] <= 16 * 5760 / 16
    assert h["info"]["corpus"]["split"] == "calibration"
    assert h["info"]["tokens_fit"] > 0 and h["info"]["tokens_heldout"] > 0
    names = h["info"]["corpus"]["documents"]["prose"] + h["info"]["corpus"]["documents"]["code"]
    from kvtc_sglang.calibration.corpus import documents

    held_out = {d.name for kind in ("prose", "code") for d in documents("evaluation", kind)}
    assert names and not set(names) & held_out  # calibration and evaluation text are disjoint


def test_save_load_roundtrip(artifact, tmp_path, lm):
    path = artifact.save(tmp_path / "a.safetensors")
    back = load_artifact(path, expect=lm.spec)
    assert back.artifact_id == artifact.artifact_id
    assert torch.equal(back.keys.basis, artifact.keys.basis)
    assert back.values.allocation == artifact.values.allocation


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"num_layers": 24}, "num_layers"),
        ({"num_kv_heads": 8}, "num_kv_heads"),
        ({"head_dim": 128}, "head_dim"),
        ({"dtype": "float16"}, "dtype"),
        ({"architecture": "Qwen2ForCausalLM"}, "architecture"),
    ],
)
def test_wrong_model_is_refused_with_the_mismatch_named(artifact_path, lm, change, needle):
    other = dataclasses.replace(lm.spec, name="other-model", **change)
    with pytest.raises(ArtifactError, match=needle):
        load_artifact(artifact_path, expect=other)


def test_wrong_rope_is_refused(artifact_path, lm):
    other = dataclasses.replace(lm.spec, rope=dataclasses.replace(lm.spec.rope, theta=10000.0))
    with pytest.raises(ArtifactError, match="rope"):
        load_artifact(artifact_path, expect=other)


def _rewrite_header(src, dst, edit):
    data = src.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8 : 8 + n])
    header = json.loads(meta["__metadata__"]["kvtc"])
    edit(header)
    meta["__metadata__"]["kvtc"] = json.dumps(header)
    new = json.dumps(meta).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    # keep tensor data offsets valid: safetensors offsets are relative to the end of the header
    dst.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n :])


def test_newer_format_version_is_refused(artifact_path, tmp_path):
    dst = tmp_path / "v2.safetensors"
    _rewrite_header(artifact_path, dst, lambda h: h.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ArtifactError, match="format version"):
        load_artifact(dst)


def test_tampered_header_is_refused(artifact_path, tmp_path):
    dst = tmp_path / "tampered.safetensors"
    _rewrite_header(artifact_path, dst, lambda h: h.update(target_ratio=99.0))
    with pytest.raises(ArtifactError, match="artifact_id"):
        load_artifact(dst)


def test_tampered_tensor_is_refused(artifact_path, tmp_path):
    data = bytearray(artifact_path.read_bytes())
    data[-10] ^= 0x40
    dst = tmp_path / "bits.safetensors"
    dst.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="artifact_id"):
        load_artifact(dst)


def test_missing_and_foreign_files_are_refused(tmp_path):
    with pytest.raises(ArtifactError, match="not found"):
        load_artifact(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(ArtifactError):
        load_artifact(junk)
    pickle_like = tmp_path / "model.pt"
    torch.save({"a": 1}, pickle_like)
    with pytest.raises(ArtifactError):
        load_artifact(pickle_like)
