"""The CPU ``sgl_kernel`` shim (kvtc_sglang/serve/cpu_shim) against torch references."""

from __future__ import annotations

import importlib.util
from types import ModuleType

import pytest
import torch

from kvtc_sglang.serve.launcher import SHIM_DIR, ServerSpec, server_command, server_env


def _shim() -> ModuleType:
    path = SHIM_DIR / "sgl_kernel" / "__init__.py"
    spec = importlib.util.spec_from_file_location("kvtc_test_sgl_kernel_shim", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the shim refuses to load on CUDA machines")


def test_assign_req_to_token_pool_matches_reference() -> None:
    shim = _shim()
    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, 1000, (8, 64), generator=g, dtype=torch.int32)
    rows = torch.tensor([5, 1, 7])
    start = torch.tensor([0, 10, 30])
    end = torch.tensor([4, 10, 62])  # the middle request gets no tokens
    locs = torch.randint(0, 5000, (int((end - start).sum()),), generator=g, dtype=torch.int64)
    expect = table.clone()
    off = 0
    for r, s, e in zip(rows.tolist(), start.tolist(), end.tolist(), strict=True):
        for t in range(s, e):
            expect[r, t] = int(locs[off])
            off += 1
    got = table.clone()
    shim.assign_req_to_token_pool_cpu(rows, got, start, end, locs, got.shape[1])
    assert torch.equal(got, expect)
    with pytest.raises(ValueError, match="pool_len"):
        shim.assign_req_to_token_pool_cpu(rows, got, start, end, locs, 63)


def test_copy_all_layer_kv_cache_matches_reference() -> None:
    shim = _shim()
    g = torch.Generator().manual_seed(1)
    # 2 layers x (K, V) buffers [slots, H, D] in bf16, as SGLang's MHA pool; one fp32 buffer of another width
    bufs = [torch.randn(40, 3, 8, generator=g).to(torch.bfloat16) for _ in range(4)] + [torch.randn(40, 5)]
    ref = [b.clone() for b in bufs]
    src = torch.tensor([3, 4, 5, 20, 39])
    tgt = torch.tensor([4, 5, 6, 0, 21])  # overlapping with the sources: reads happen before writes
    for b in ref:
        b[tgt] = b[src].clone()
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
    strides = torch.tensor([b[0].numel() * b.element_size() for b in bufs], dtype=torch.int64)
    shim.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt, src)
    for got, want in zip(bufs, ref, strict=True):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="rows"):
        shim.copy_all_layer_kv_cache_cpu(ptrs, strides, tgt[:2], src)


def test_speculative_ops_raise_and_no_torch_ops_registered() -> None:
    shim = _shim()
    for name in shim.SPECULATIVE_OPS:
        with pytest.raises(NotImplementedError, match="speculative"):
            getattr(shim, name)()
    # SGLang's AMX check: the shim must not register torch.ops.sgl_kernel ops
    assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed")


def test_launcher_puts_shim_on_path_only_for_cpu() -> None:
    spec = ServerSpec("kvtc", "m", "cal.safetensors", cpu=True, extra=["--max-total-tokens", "2048"])
    env = server_env(spec, base={"PYTHONPATH": "/x"})
    assert env["PYTHONPATH"].split(":")[0] == str(SHIM_DIR) and env["SGLANG_USE_CPU_ENGINE"] == "1"
    cmd = server_command(spec, "127.0.0.1", 1234)
    assert cmd[cmd.index("--kv-backend") + 1] == "kvtc" and cmd.count("--max-total-tokens") == 1
    assert "--sleep-on-idle" in cmd and cmd[cmd.index("--device") + 1] == "cpu"
    gpu = ServerSpec("vanilla", "m", cpu=False)
    assert "--device" not in server_command(gpu, "127.0.0.1", 1) and "SGLANG_USE_CPU_ENGINE" not in server_env(
        gpu, base={})
    with pytest.raises(ValueError, match="calibration"):
        server_command(ServerSpec("kvtc", "m", cpu=True), "127.0.0.1", 1)
