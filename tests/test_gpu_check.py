"""The CPU-runnable part of the one-command GPU check: the plan's budgets, the bundle's checks, the import
guard that holds a process to the GPU image's packages, the dry run, the refusals, and the --smoke run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
# a gpu_bundle/ folder in the checkout makes ruff sort gpu_bundle as first party: keep this order
# isort: off
import gpu_bundle  # noqa: E402
import gpu_check  # noqa: E402
import gpu_dryrun  # noqa: E402
import gpu_image  # noqa: E402

# isort: on

NVCOMP_WHEEL = "nvidia_nvcomp_cu13-5.0.0.6-py3-none-manylinux_2_28_x86_64.whl"


def run_check(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip


def fake_wheel(folder: Path, name: str = NVCOMP_WHEEL, cpython: tuple[str, ...] = ("311", "312")) -> Path:
    """A wheel laid out as nvCOMP's (namespace ``nvidia``, one binding per CPython, headers); no real code."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = "-".join(name.split("-")[:2]) + ".dist-info"
    files = {"nvidia/__init__.py": "__path__ = __import__('pkgutil').extend_path(__path__, __name__)\n",
             "nvidia/nvcomp/__init__.py": "", "nvidia/nvcomp/include/nvcomp/deflate.h": "/* header */\n",
             **{f"nvidia/nvcomp/nvcomp_impl.cpython-{v}-x86_64-linux-gnu.so": "\0" for v in cpython},
             f"{dist}/METADATA": "Metadata-Version: 2.1\nName: nvidia-nvcomp-cu13\nVersion: 5.0.0.6\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: false\n",
             f"{dist}/top_level.txt": "nvidia\n"}  # fmt: skip
    with zipfile.ZipFile(folder / name, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
        zf.writestr(f"{dist}/RECORD", "".join(f"{p},,\n" for p in [*files, f"{dist}/RECORD"]))
    return folder / name


def small_artifact(art, out: Path, rank: int = 64) -> Path:  # noqa: ANN001 (a CalibrationArtifact)
    """The calibration's leading components only (the groups ending by ``rank``): a valid, smaller artifact."""
    from kvtc_sglang.codec.allocation import Allocation

    def cut(s):  # noqa: ANN001, ANN202
        alloc = Allocation(tuple(g for g in s.allocation.groups if g.start + g.size <= rank))
        return dataclasses.replace(s, basis=s.basis[:, : alloc.rank].contiguous(),
                                   fp8_scale=s.fp8_scale[: alloc.rank].contiguous(), allocation=alloc)  # fmt: skip

    return dataclasses.replace(art, keys=cut(art.keys), values=cut(art.values)).save(
        out / "smollm2-135m-instruct.small.kvtc.safetensors")  # fmt: skip


@pytest.fixture(scope="module")
def bundle(artifact, kv_bank, tmp_path_factory) -> Path:
    """A good bundle: real K/V of 1024 tokens, a real (cut) calibration, the config, a stand-in nvCOMP wheel."""
    k, v = kv_bank
    out = tmp_path_factory.mktemp("bundle")
    art = small_artifact(artifact, tmp_path_factory.mktemp("art"))
    gpu_bundle.write_bundle(art, k, v, {"model_type": "llama", "num_hidden_layers": 30}, out)
    gpu_bundle.slim_wheel(fake_wheel(tmp_path_factory.mktemp("wheels")), (out / "wheels"))
    gpu_bundle.write_manifest(out)
    return out


def copy_of(bundle: Path, dest: Path) -> Path:
    return Path(shutil.copytree(bundle, dest / "bundle", copy_function=os.link))  # hard links: no copying


def dry_run(bundle: Path, out: Path, **kwargs) -> tuple[int, dict]:  # noqa: ANN003
    rc = gpu_dryrun.main(bundle, out, **kwargs)
    return rc, json.loads((out / "gpu_check_dryrun.json").read_text())


def test_plan_fits_eight_minutes_most_valuable_first():
    assert gpu_check.plan_problems() == []
    assert gpu_check.SETUP_S + sum(s.budget_s for s in gpu_check.PLAN) <= gpu_check.TOTAL_BUDGET_S == 480
    assert [s.name for s in gpu_check.PLAN] == ["environment", "kernels", "roofline", "nvcomp", "nvcomp_throughput",
                                                "restore_vs_prefill", "sglang_streams"]  # fmt: skip
    assert all(0 < s.test_timeout_s <= s.budget_s for s in gpu_check.PLAN if s.tests)
    longer = (*gpu_check.PLAN, gpu_check.Step("extra", "more", 20, tests=("test_gpu.py",), test_timeout_s=30))
    assert gpu_check.plan_problems(longer) == [
        "steps' budgets sum to 490 s, over 480 s", "extra: per-test timeout 30 s not within its 20 s budget"]


def test_wheels_are_checked_for_the_image(tmp_path):
    good = fake_wheel(tmp_path / "a")
    assert gpu_image.wheel_problems(good) == [] and gpu_image.wheel_modules(good) == {"nvidia.nvcomp"}
    old = fake_wheel(tmp_path / "b", cpython=("310", "311"))
    assert gpu_image.wheel_problems(old) == [
        f"{NVCOMP_WHEEL}: extension modules for CPython ['310', '311'], none for 312"]  # fmt: skip
    mac = fake_wheel(tmp_path / "c", name="pkg-1.0-cp312-cp312-macosx_11_0_arm64.whl")
    assert gpu_image.wheel_problems(mac) == ["pkg-1.0-cp312-cp312-macosx_11_0_arm64.whl: platform tag "
                                             "macosx_11_0_arm64 is not manylinux x86_64"]  # fmt: skip
    slim = gpu_bundle.slim_wheel(good, tmp_path)
    names = zipfile.ZipFile(slim).namelist()
    assert "nvidia/nvcomp/nvcomp_impl.cpython-312-x86_64-linux-gnu.so" in names
    assert not any("cpython-311" in n or "/include/" in n for n in names)
    record = zipfile.ZipFile(slim).read("nvidia_nvcomp_cu13-5.0.0.6.dist-info/RECORD").decode()
    assert sorted(line.split(",")[0] for line in record.splitlines()) == sorted(names)


def test_the_guard_refuses_what_the_image_lacks(tmp_path):
    """Absent packages (sglang, flashinfer: installed here) and packages outside the image set are refused."""
    (tmp_path / "uses_sglang.py").write_text("import sglang\n")
    (tmp_path / "uses_flashinfer.py").write_text("import flashinfer\n")
    (tmp_path / "uses_openai.py").write_text("import openai\n")  # installed here, not in the image
    (tmp_path / "fine.py").write_text("import importlib.util, json, numpy\n"
                                      "assert importlib.util.find_spec('sglang') is None\n")  # fmt: skip
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_image.py"), "--json", str(out),
                           "--first-party", str(tmp_path), "--import", "uses_sglang", "uses_flashinfer",
                           "uses_openai", "fine"], capture_output=True, text=True, check=False)  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    res = json.loads(out.read_text())["imports"]
    assert res["fine"] == {"ok": True}
    absent = "is absent from the GPU image and no carried wheel provides it"
    assert res["uses_sglang"]["error"] == f"ModuleNotFoundError: sglang {absent}"
    assert res["uses_flashinfer"]["error"] == f"ModuleNotFoundError: flashinfer {absent}"
    assert "openai (imported by " in res["uses_openai"]["error"]
    assert "is not in the GPU image's package set (benchmarks/gpu_image.py) nor carried" in res["uses_openai"]["error"]


def test_bundle_holds_what_the_gpu_tests_read(bundle, kv_bank):
    kv = load_file(str(bundle / "kv.safetensors"))
    assert torch.equal(kv["k"], kv_bank[0]) and torch.equal(kv["v"], kv_bank[1])
    assert torch.equal(kv["positions"], torch.arange(kv_bank[0].shape[1]))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["wheels"] == {NVCOMP_WHEEL: ["nvidia.nvcomp"]}
    assert set(manifest["files"]) == {"kv.safetensors", "config.json", "smollm2-135m-instruct.small.kvtc.safetensors",
                                      f"wheels/{NVCOMP_WHEEL}"}  # fmt: skip


def test_dry_run_passes_on_a_good_bundle(bundle, tmp_path):
    rc, rep = dry_run(bundle, tmp_path)
    assert rc == 0, rep["problems"]
    assert rep["bundle"]["total_mib"] < 64 and rep["bundle"]["carried"] == ["nvidia.nvcomp"]
    files = rep["guard"]["collect"]["files"]
    assert files["tests/test_triton_kernels.py"]["outcome"] == "passed" and files["tests/test_gpu.py"]["tests"] == 3
    for name in ("test_stream_order.py", "test_background.py", "test_gpu_flashinfer.py"):  # sglang does not travel
        assert files[f"tests/{name}"]["outcome"] == "skipped"
    assert rep["guard"]["imports"]["nvidia.nvcomp"]["ok"]  # resolved in the unpacked wheel, not imported
    assert rep["not_carried"] == ["sglang"]
    assert "**total** | **470** of 480" in (tmp_path / "gpu_check_dryrun.md").read_text()


def test_dry_run_fails_on_a_bundle_over_64_mib(bundle, tmp_path):
    big = copy_of(bundle, tmp_path)
    with (big / "padding.bin").open("wb") as fh:
        fh.truncate(48 * gpu_bundle.MIB)  # sparse: no disk used
    rc, rep = dry_run(big, tmp_path / "out")
    assert rc == 1
    assert any("MiB, over the 64 MiB the device takes" in p for p in rep["problems"]), rep["problems"]


def test_dry_run_fails_on_a_missing_file_or_wheel(bundle, tmp_path):
    bad = copy_of(bundle, tmp_path)
    (bad / "kv.safetensors").unlink()
    (bad / "wheels" / NVCOMP_WHEEL).unlink()
    problems = gpu_bundle.validate(bad, required_modules=gpu_check.REQUIRED_CARRIED)["problems"]
    assert "missing kv.safetensors: remake the bundle (benchmarks/gpu_bundle.py)" in problems
    assert f"wheels/{NVCOMP_WHEEL} is listed in manifest.json but missing" in problems
    assert any(p.startswith("no wheel in") and "provides nvidia.nvcomp" in p for p in problems)


def test_dry_run_fails_on_an_import_escaping_the_image(bundle, tmp_path):
    (tmp_path / "sneaky.py").write_text("import flashinfer  # not carried\n")
    rc, rep = dry_run(bundle, tmp_path / "out", extra_imports=("sneaky",), extra_first_party=(tmp_path,))
    assert rc == 1
    assert ("import sneaky fails with the image's packages plus the carried wheels: ModuleNotFoundError: "
            "flashinfer is absent from the GPU image and no carried wheel provides it") in rep["problems"]


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
    """The real steps on the CPU interpreter: a kernel test, an nvCOMP test, one roofline row at T=16."""
    from kvtc_sglang.codec import KVTCCodec, load_artifact

    proc = run_check("--bundle", str(bundle), "--smoke", "--out", str(tmp_path), "--steps", "kernels", "roofline",
                     "nvcomp", "sglang_streams")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["mode"] == "smoke" and report["ok"]
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["environment", "kernels", "roofline", "nvcomp", "sglang_streams"]
    (tests,) = steps["kernels"]["tests"]
    assert tests["passed"] == 1 and tests["failures"] == tests["errors"] == 0
    assert steps["nvcomp"]["status"] == "ok" and steps["sglang_streams"]["status"] == "not run"
    ((row,),) = [r["rows"] for r in steps["roofline"]["bench"]["results"]]
    small = load_artifact(next(bundle.glob("*.kvtc.safetensors")))
    assert row["tokens"] == 16 and row["payload_bytes"] == KVTCCodec(small).payload_nbytes(16)
    s = small.spec
    assert row["kv_bytes"] == 2 * s.num_layers * s.num_kv_heads * s.head_dim * 2 * 16  # bf16 K and V
    md = (tmp_path / "gpu_check.md").read_text()
    assert "SMOKE" in md and "| 16 |" in md and "**OK**" in md
