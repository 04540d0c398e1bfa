"""The CPU-runnable part of the one-command GPU check: bundle making, the refusal without CUDA, --smoke."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_bundle  # noqa: E402


def run_check(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def bundle(artifact_path, kv_bank, tmp_path_factory) -> Path:
    k, v = kv_bank
    out = tmp_path_factory.mktemp("bundle")
    nbytes = gpu_bundle.write_bundle(artifact_path, k, v, {"model_type": "llama"}, out)
    assert nbytes == sum(f.stat().st_size for f in out.iterdir())
    return out


def test_bundle_holds_what_the_gpu_tests_read(bundle, artifact_path, kv_bank):
    kv = load_file(str(bundle / "kv.safetensors"))
    assert torch.equal(kv["k"], kv_bank[0]) and torch.equal(kv["v"], kv_bank[1])
    assert torch.equal(kv["positions"], torch.arange(kv_bank[0].shape[1]))
    assert (bundle / artifact_path.name).read_bytes() == artifact_path.read_bytes()
    assert json.loads((bundle / "config.json").read_text()) == {"model_type": "llama"}


def test_bundle_over_the_transfer_budget_is_refused():
    gpu_bundle.check_budget(56 * gpu_bundle.MIB, 56)
    with pytest.raises(ValueError, match=r"bundle is 56\.1 MiB, over the 56 MiB budget"):
        gpu_bundle.check_budget(56 * gpu_bundle.MIB + 100_000, 56)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_refuses_clearly_without_cuda(bundle, tmp_path):
    proc = run_check("--bundle", str(bundle), "--out", str(tmp_path), env_extra={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert "gpu_check needs a CUDA GPU and found none" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


def test_not_a_bundle_is_refused(tmp_path):
    proc = run_check("--bundle", str(tmp_path), "--smoke")
    assert proc.returncode == 2 and "is not a bundle" in proc.stderr


def test_smoke_run_writes_the_report(bundle, artifact, tmp_path):
    """The whole script on the CPU interpreter at T=16: one test selection, one benchmark row, both reports."""
    from kvtc_sglang.codec import KVTCCodec

    proc = run_check("--bundle", str(bundle), "--smoke", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["smoke"] and report["ok"]
    (tests,) = report["tests"]
    assert tests["passed"] == 1 and tests["failures"] == tests["errors"] == 0
    (bench,) = report["benchmarks"]
    (row,) = bench["rows"]
    assert row["tokens"] == 16
    assert row["payload_bytes"] == KVTCCodec(artifact).payload_nbytes(16)
    assert row["kv_bytes"] == 2 * kv_bytes_per_token(artifact) * 16
    md = (tmp_path / "gpu_check.md").read_text()
    assert "SMOKE" in md and "| 16 |" in md and "**OK**" in md


def kv_bytes_per_token(artifact) -> int:
    s = artifact.spec
    return s.num_layers * s.num_kv_heads * s.head_dim * 2  # bf16 K (or V) of one token
