"""Shared fixtures and helpers: the real SmolLM2 model, a small real calibration, real K/V from held-out
text; ``rel_err``, ``paged_slots`` and ``MIXED`` (import them with ``from conftest import ...``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # Triton kernels run in Triton's CPU interpreter; must be set before any kernel module is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.manual_seed(0)


# A folder made by benchmarks/gpu_bundle.py (artifact, K/V of >= 1024 real tokens): on a GPU machine without
# the model package, the artifact and K/V fixtures read it instead of running the model.
GPU_BUNDLE = os.environ.get("KVTC_GPU_BUNDLE")
MODEL_FIXTURES = {"lm", "artifact_path", "artifact", "codec", "real_kv", "kv_bank", "bank", "codec_err"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs the real model (or its calibration or K/V) with the ``model`` marker, so
    ``pytest -m "not model"`` runs the quick, model-free part of the suite."""
    for item in items:
        if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


def _bundle_kv(num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file

    kv = load_file(str(Path(GPU_BUNDLE) / "kv.safetensors"))  # k, v [L, T, H, D] bf16
    if kv["k"].shape[1] < num_tokens:
        raise ValueError(f"{GPU_BUNDLE} holds {kv['k'].shape[1]} tokens of K/V, the tests need {num_tokens}")
    return kv["k"][:, :num_tokens].contiguous(), kv["v"][:, :num_tokens].contiguous()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float32 (Frobenius norms over every element)."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def paged_slots(num_tokens: int, page_size: int, rows: int, seed: int, device: torch.device | None = None):
    """``[T]`` int64 pool rows as SGLang's paged allocator hands them out: random whole pages of ``page_size``
    rows out of ``rows`` (seeded), the last page partly used."""
    g = torch.Generator().manual_seed(seed)
    pages = torch.randperm(rows // page_size, generator=g)[: -(-num_tokens // page_size)]
    slots = (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)[:num_tokens]  # [T]
    return slots if device is None else slots.to(device)


def _mixed_allocation():
    from kvtc_sglang.codec.allocation import Allocation, Group

    # Every kind, sizes 1 to 64, a drop inside the coded range (R = 116).
    return Allocation(
        (
            Group(0, 1, "fp8"),
            Group(1, 1, "fp8"),
            Group(2, 16, "int8"),
            Group(18, 16, "fp8"),
            Group(34, 64, "int4"),
            Group(98, 16, "int2"),
            Group(114, 1, "drop"),
            Group(115, 1, "int2"),
        )
    )


MIXED = _mixed_allocation()


@pytest.fixture(scope="session")
def lm():
    """The default model computing in float32 with a bfloat16 KV cache (as the CPU server and the offline
    CLIs run it: exact logits, and about 10x faster than bf16 arithmetic here)."""
    from kvtc_sglang.calibration.model import load_default_model

    return load_default_model(torch.bfloat16, compute_dtype=torch.float32)


@pytest.fixture(scope="session")
def artifact_path(request, tmp_path_factory) -> Path:
    """A real but small calibration (about 6k tokens) of the default model at 16x (or the GPU bundle's), with
    the two tp-2 rank artifacts of the same collect beside it (``codec.tp.rank_artifact_path``)."""
    if GPU_BUNDLE:
        return next(Path(GPU_BUNDLE).glob("*.kvtc.safetensors"))
    from kvtc_sglang.calibration.fit import CalibrationConfig, collect, write_artifacts
    from kvtc_sglang.calibration.tp import write_rank_artifacts

    lm = request.getfixturevalue("lm")

    cfg = CalibrationConfig(tokens=6144, seq_len=1024, holdout_every=3, ratios=(16.0,))
    reuse = os.environ.get("KVTC_TEST_ARTIFACT_DIR")  # developer speed-up: keep the calibration between runs
    out = Path(reuse) if reuse else tmp_path_factory.mktemp("artifacts")
    cached = out / "smollm2-135m-instruct.r16.kvtc.safetensors"
    if reuse and cached.exists() and len(list(out.glob("*.tp2-rank*.kvtc.safetensors"))) == 2:
        return cached
    col = collect(lm, cfg, show_progress=False)
    (path,) = write_artifacts(lm, cfg, col, out, show_progress=False)
    write_rank_artifacts(lm, cfg, col, out, tp_size=2, layout="cpu", show_progress=False)
    return path


@pytest.fixture(scope="session")
def artifact(artifact_path, request):
    from kvtc_sglang.codec import load_artifact

    return load_artifact(artifact_path, expect=None if GPU_BUNDLE else request.getfixturevalue("lm").spec)


@pytest.fixture(scope="session")
def codec(artifact):
    from kvtc_sglang.codec import KVTCCodec

    return KVTCCodec(artifact)


@pytest.fixture(scope="session")
def real_kv(request):
    """K/V ``[L, 600, H, D]`` bf16 of a held-out prose segment and its positions."""
    if GPU_BUNDLE:
        return (*_bundle_kv(600), torch.arange(600))
    from kvtc_sglang.calibration.corpus import token_sequences
    from kvtc_sglang.calibration.model import prefill_kv

    lm = request.getfixturevalue("lm")

    seqs, _ = token_sequences(lm.tokenizer, "evaluation", "prose", 600, 600)
    k, v, _ = prefill_kv(lm.model, seqs[0], torch.bfloat16)
    return k, v, torch.arange(600)


@pytest.fixture(scope="session")
def kv_bank(request):
    """K/V ``[L, 1024, H, D]`` bf16 of 1024 held-out prose tokens: the K/V written into SGLang pools."""
    if GPU_BUNDLE:
        return _bundle_kv(1024)
    from kvtc_sglang.calibration.corpus import token_sequences
    from kvtc_sglang.calibration.model import prefill_kv

    lm = request.getfixturevalue("lm")

    seqs, _ = token_sequences(lm.tokenizer, "evaluation", "prose", 1024, 1024)
    k, v, _ = prefill_kv(lm.model, seqs[0], torch.bfloat16)
    return k, v


@pytest.fixture(scope="session")
def bank(kv_bank):
    """``kv_bank`` as the replay driver's K/V source (:class:`~kvtc_sglang.workloads.replay.BankKV`)."""
    from kvtc_sglang.workloads.replay import BankKV

    return BankKV(*kv_bank)


@pytest.fixture(scope="session")
def codec_err(codec, kv_bank) -> float:
    """The codec's own relative round-trip error on 512 bank tokens (K and V, the larger): the reference."""
    k, v = kv_bank[0][:, :512], kv_bank[1][:, :512]
    k2, v2, _ = codec.decode(codec.encode(k, v, torch.arange(512)))
    return max(rel_err(k2, k), rel_err(v2, v))


@pytest.fixture(scope="session")
def joint_path(request, artifact, artifact_path, tmp_path_factory) -> Path:
    """A small residual calibration (joint encoding) fitted against the test calibration, saved beside a copy of it
    (the server finds the reference calibration there), with the two tp-2 ranks' residual calibrations against the
    rank artifacts beside it (``codec.tp.rank_artifact_path``)."""
    from kvtc_sglang.calibration.residual import ResidualFitConfig, fit_residual, write_residuals
    from kvtc_sglang.codec.tp import rank_artifact_path

    out = tmp_path_factory.mktemp("joint")
    lm = request.getfixturevalue("lm")
    cfg = ResidualFitConfig(files=1, file_tokens=384, ratio=128.0)
    ranks = [rank_artifact_path(artifact_path, 2, rank) for rank in range(2)]
    for src in [artifact_path, *ranks]:
        if src.exists():
            (out / src.name).write_bytes(src.read_bytes())
    if all(r.exists() for r in ranks):
        write_residuals(lm, cfg, out / artifact_path.name, out / "residual.safetensors", tp_size=2)
    cal = fit_residual(lm, artifact, cfg, artifact_path.name)
    return cal.save(out / "residual.safetensors")
