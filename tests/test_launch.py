"""The SGLang plugin and backend factory: CLI options, start-up refusals, registry, real cache construction."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.registry import TreeCacheBuildContext, get_radix_cache_factory

from kvtc_sglang.cache.config import ENV_VAR, KVTCCacheConfig
from kvtc_sglang.cache.factory import build_kvtc_cache, cpu_has_native_bf16
from kvtc_sglang.cache.radix import KVTCRadixCache
from kvtc_sglang.launch import plugin
from kvtc_sglang.workloads.replay import build_pool


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--radix-cache-backend", default=None)
    plugin.add_cli_args(None, parser)
    return parser.parse_args(argv)


def test_options_become_a_config(artifact_path):
    ns = parse(["--kv-backend", "kvtc", "--kvtc-calibration", str(artifact_path), "--kvtc-window-tokens", "64",
                "--kvtc-idle-seconds", "2.5", "--kvtc-dot-precision", "ieee"])
    cfg = plugin.config_from_namespace(ns)
    assert cfg == KVTCCacheConfig(calibration=str(artifact_path), window_tokens=64, idle_seconds=2.5,
                                  dot_precision="ieee")
    assert KVTCCacheConfig.from_json(cfg.to_json()) == cfg
    assert plugin.config_from_namespace(parse(["--radix-cache-backend", "kvtc", "--kvtc-calibration",
                                                str(artifact_path)])) is not None
    assert plugin.config_from_namespace(parse([])) is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kv-backend", "kvtc"], "needs --kvtc-calibration"),
        (["--kvtc-sink-tokens", "8"], "--kvtc-sink-tokens given without --kv-backend kvtc"),
        (["--kv-backend", "kvtc", "--kvtc-calibration", "/nonexistent.kvtc.safetensors"], "--kvtc-calibration"),
        (["--kv-backend", "kvtc", "--kvtc-calibration", "CAL", "--kvtc-sink-tokens", "-1"], "sink_tokens"),
        (["--kv-backend", "kvtc", "--kvtc-calibration", "CAL", "--kvtc-store-fraction", "1.5"], "store_fraction"),
        (["--kv-backend", "kvtc", "--kvtc-calibration", "CAL", "--kvtc-idle-seconds", "nan"], "idle_seconds"),
        (["--kv-backend", "kvtc", "--kvtc-calibration", "CAL", "--kvtc-dot-precision", "fp16"], "dot_precision"),
    ],
)
def test_bad_options_are_refused_by_name(argv, message, artifact_path):
    argv = [str(artifact_path) if a == "CAL" else a for a in argv]
    with pytest.raises(ValueError, match=message):
        plugin.config_from_namespace(parse(argv))


def test_unknown_backend_and_unreadable_calibration(tmp_path):
    with pytest.raises(SystemExit):
        parse(["--kv-backend", "lmcache"])  # argparse: invalid choice
    bad = tmp_path / "bad.kvtc.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="--kvtc-calibration"):
        plugin.config_from_namespace(parse(["--kv-backend", "kvtc", "--kvtc-calibration", str(bad)]))


def _ctx(lm, dtype: str = "bfloat16", **overrides) -> TreeCacheBuildContext:
    spec = dataclasses.replace(lm.spec, dtype=dtype)
    _, allocator = build_pool(spec, 1024, 1)
    params = CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator, page_size=1)
    fields = dict(
        server_args=None, params=params, is_hybrid_swa=False, is_hybrid_ssm=False, enable_hierarchical_cache=False,
        disable_radix_cache=False, tp_worker=None, tp_size=1, tp_rank=0, tp_group=None,
        model_config=SimpleNamespace(hf_text_config=overrides.pop("hf", lm.model.config), model_path="smollm2"),
    )
    fields.update(overrides)
    return TreeCacheBuildContext(**fields)


def test_registered_factory_builds_the_cache(lm, artifact_path, monkeypatch):
    plugin.register()
    assert get_radix_cache_factory("kvtc") is build_kvtc_cache
    monkeypatch.setenv(ENV_VAR, KVTCCacheConfig(calibration=str(artifact_path)).to_json())
    cache = get_radix_cache_factory("kvtc")(_ctx(lm))
    assert isinstance(cache, KVTCRadixCache) and cache.store_max_tokens == 512 and cache.store.num_slots == 0
    # --kvtc-dot-precision auto: bf16 projections on a CPU pool where the CPU has native bf16 GEMMs
    assert cache.codec.dot_precision == ("bf16" if cpu_has_native_bf16() else "ieee")
    assert cache.codec.payload_backend(torch.device("cpu")).precision == cache.codec.dot_precision
    monkeypatch.setenv(ENV_VAR, KVTCCacheConfig(calibration=str(artifact_path), dot_precision="ieee").to_json())
    assert build_kvtc_cache(_ctx(lm)).codec.dot_precision == "ieee"
    monkeypatch.setenv(ENV_VAR, KVTCCacheConfig(calibration=str(artifact_path), dot_precision="tf32").to_json())
    with pytest.raises(ValueError, match="torch backend's dot_precision must be one of .*'tf32'"):
        build_kvtc_cache(_ctx(lm))  # a GPU kernels' precision on a CPU pool: refused at start-up


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dtype": "float16"}, "dtype: calibration has 'bfloat16', model has 'float16'"),
        ({"is_hybrid_swa": True}, "sliding-window"),
        ({"enable_hierarchical_cache": True}, "hierarchical"),
        ({"tp_size": 2}, "tp-size 1"),
        ({"layers": 12}, "num_layers: calibration has 30, model has 12"),
        ({"arch": "Gemma3ForCausalLM"}, "not supported"),
    ],
)
def test_factory_refuses_what_it_cannot_serve(lm, artifact_path, monkeypatch, kwargs, message):
    monkeypatch.setenv(ENV_VAR, KVTCCacheConfig(calibration=str(artifact_path)).to_json())
    hf = copy.deepcopy(lm.model.config)
    if "layers" in kwargs:
        hf.num_hidden_layers = kwargs.pop("layers")
    if "arch" in kwargs:
        hf.architectures = [kwargs.pop("arch")]
    with pytest.raises(ValueError, match=message):
        build_kvtc_cache(_ctx(lm, hf=hf, **kwargs))


def test_factory_without_calibration(lm, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="--kvtc-calibration"):
        build_kvtc_cache(_ctx(lm))


def _launch(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != ENV_VAR}
    return subprocess.run([sys.executable, "-m", "sglang.launch_server", *args], capture_output=True, text=True,
                          env=env, timeout=300, check=False)


def test_launch_server_help_lists_the_plugin_options():
    out = _launch("--help")
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--kv-backend {kvtc}", "--kvtc-calibration", "--kvtc-sink-tokens", "--kvtc-window-tokens",
                 "--kvtc-idle-seconds", "--kvtc-store-fraction"):
        assert flag in out.stdout


def test_launch_server_stops_with_one_clear_line():
    out = _launch("--model-path", "/nonexistent-model", "--kv-backend", "kvtc")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith("kvtc: error: --kv-backend kvtc needs --kvtc-calibration")


def test_start_up_refuses_a_local_model_the_calibration_does_not_fit(lm, artifact_path, tmp_path):
    cfg = copy.deepcopy(lm.model.config)
    cfg.dtype = torch.bfloat16  # as the HF export is saved (the test model computes in fp32)
    cfg.save_pretrained(tmp_path / "same")
    ok = parse(["--kv-backend", "kvtc", "--kvtc-calibration", str(artifact_path)])
    ok.model_path = str(tmp_path / "same")
    assert plugin.config_from_namespace(ok) is not None
    cfg.num_key_value_heads = 1
    cfg.save_pretrained(tmp_path / "other")
    bad = parse(["--kv-backend", "kvtc", "--kvtc-calibration", str(artifact_path)])
    bad.model_path = str(tmp_path / "other")
    with pytest.raises(ValueError, match="num_kv_heads: calibration has 3, model has 1"):
        plugin.config_from_namespace(bad)
    bad.model_path, bad.dtype = str(tmp_path / "same"), "float16"
    with pytest.raises(ValueError, match="dtype: calibration has 'bfloat16', model has 'float16'"):
        plugin.config_from_namespace(bad)
    bad.dtype, bad.kv_cache_dtype = "auto", "fp8_e4m3"
    with pytest.raises(ValueError, match="16-bit KV caches"):
        plugin.config_from_namespace(bad)
    bad.kv_cache_dtype, bad.tp_size = "auto", 2
    with pytest.raises(ValueError, match="tp-size 1"):
        plugin.config_from_namespace(bad)


def test_main_job_calibration_paths_never_mistake_a_small_calibration_for_the_full_one(tmp_path, monkeypatch):
    from kvtc_sglang.serve import launcher

    full = launcher.calibration_path(tmp_path)
    small = launcher.calibration_path(tmp_path, 16_384)
    assert full == tmp_path / "smollm2-135m-instruct.r16.kvtc.safetensors"
    assert small == tmp_path / "t16384" / full.name
    calls: list[list[str]] = []
    monkeypatch.setattr("kvtc_sglang.serve.export.export_default_model", lambda path: path)
    monkeypatch.setattr(launcher.subprocess, "run", lambda cmd, check: calls.append(cmd))
    _, cal = launcher.prepare_default_model(tmp_path, tokens=16_384, fisher_every=4)
    assert cal == small and calls[0][calls[0].index("--tokens") + 1] == "16384"
    assert calls[0][calls[0].index("--fisher-every") + 1] == "4"
    assert calls[0][calls[0].index("--out") + 1] == str(small.parent)
    full.write_bytes(b"")  # once the full calibration exists, it is the one used
    assert launcher.prepare_default_model(tmp_path, tokens=16_384)[1] == full and len(calls) == 1
    with pytest.raises(ValueError, match="calibration tokens must be >= 1, got 0"):
        launcher.prepare_default_model(tmp_path, tokens=0)
    with pytest.raises(ValueError, match="fisher_every must be >= 1, got 0"):
        launcher.prepare_default_model(tmp_path, tokens=16_384, fisher_every=0)


def test_start_up_at_tp2_needs_each_ranks_calibration_and_a_shared_clock(lm, artifact_path, tmp_path):
    cfg = copy.deepcopy(lm.model.config)
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(tmp_path / "model")
    def ns(calibration, *more, device="cpu"):
        out = parse(["--kv-backend", "kvtc", "--kvtc-calibration", str(calibration), *more])
        out.tp_size, out.device, out.model_path = 2, device, str(tmp_path / "model")
        return out

    assert plugin.config_from_namespace(ns(artifact_path)) is not None  # the rank artifacts lie beside it
    alone = tmp_path / "alone" / artifact_path.name
    alone.parent.mkdir()
    alone.write_bytes(artifact_path.read_bytes())
    with pytest.raises(ValueError, match=r"tp2-rank0\.kvtc\.safetensors is missing"):
        plugin.config_from_namespace(ns(alone))
    with pytest.raises(ValueError, match="--kvtc-idle-seconds 5 reads each rank's own clock"):
        plugin.config_from_namespace(ns(artifact_path, "--kvtc-idle-seconds", "5"))
    with pytest.raises(ValueError, match="CPU engine only"):
        plugin.config_from_namespace(ns(artifact_path, device="cuda"))
