"""The shared-files trace (serve/shared_files.py) and the joint benchmark's columns and table (serve/joint_bench.py):
real tokenizer and corpus, no server."""

from __future__ import annotations

import json

import pytest
from serve_support import hf_model

from kvtc_sglang.calibration.corpus import documents
from kvtc_sglang.serve.joint_bench import JOINT_FLAG, default_pool, entries, format_report, joint_keys
from kvtc_sglang.serve.sessions import pool_for_everything, turn_counts
from kvtc_sglang.serve.shared_files import SharedFilesConfig, file_block, make_shared_trace

CFG = SharedFilesConfig(seed=5, sessions=6, files=2, file_tokens=800, history_tokens=(150, 500), turns=3)
READ = "Tool output of read_file("


@pytest.fixture(scope="module")
def model_dir() -> str:
    return hf_model()


@pytest.fixture(scope="module")
def trace(model_dir: str) -> dict:
    return make_shared_trace(CFG, model_dir)


def _first_user(conv: list[dict]) -> str:
    return conv[0]["messages"][1]["content"]


def _block(conv: list[dict]) -> str:
    text = _first_user(conv)
    return text[text.index(READ) :]


def test_deterministic_and_seeded(trace, model_dir):
    assert json.dumps(make_shared_trace(CFG, model_dir)) == json.dumps(trace)
    other = make_shared_trace(SharedFilesConfig(**{**CFG.__dict__, "seed": 6}), model_dir)
    assert other["conversations"] != trace["conversations"]


def test_every_reader_of_a_file_gets_the_identical_string(trace):
    meta = trace["metadata"]
    convs = trace["conversations"]
    assert [m["file_index"] for m in meta["sessions"]] == [s % CFG.files for s in range(CFG.sessions)]
    for f, fmeta in enumerate(meta["files"]):
        blocks = {_block(convs[s]) for s in fmeta["sessions"]}
        assert len(blocks) == 1 and fmeta["sessions"] == list(range(f, CFG.sessions, CFG.files))
        block = blocks.pop()
        assert block.startswith(file_block(fmeta["path"], "")) and _first_user(convs[f]).endswith(block)
    assert len({_block(c) for c in convs}) == CFG.files  # distinct files
    assert len({conv[0]["messages"][0]["content"] for conv in convs}) == CFG.sessions  # no shared radix branch


def test_same_tokens_at_different_offsets(trace, model_dir):
    from transformers import AutoTokenizer

    tk = AutoTokenizer.from_pretrained(model_dir)
    meta = trace["metadata"]
    by_file: dict[int, list[int]] = {}
    for conv, smeta in zip(trace["conversations"], meta["sessions"], strict=True):
        ids = tk.apply_chat_template(conv[0]["messages"], add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        block = tk(_block(conv), add_special_tokens=False)["input_ids"]
        at = [i for i in range(len(ids) - len(block) + 1) if ids[i : i + len(block)] == block]
        assert len(at) == 1, "the file's tokens must appear intact in the prompt"
        assert abs(at[0] - smeta["file_offset_tokens"]) <= 2
        by_file.setdefault(smeta["file_index"], []).append(at[0])
    for offsets in by_file.values():
        assert len(set(offsets)) == len(offsets)  # the same text at a different offset in every session


def test_real_text_and_sizes(trace, model_dir):
    corpus = [d.text for kind in ("code", "prose") for d in documents("evaluation", kind)]
    meta = trace["metadata"]
    for conv, smeta in zip(trace["conversations"], meta["sessions"], strict=True):
        body = _block(conv).split(":\n", 1)[1]
        assert len(body) > 500 and any(body in text for text in corpus)
        history = _first_user(conv).split("`:\n", 1)[1].split("\n" + READ)[0]
        assert len(history) > 100 and any(history in text for text in corpus)
        assert smeta["history"] != smeta["file"]
        assert 0.7 * CFG.history_tokens[0] <= smeta["history_tokens"] <= CFG.history_tokens[1]
        est = smeta["estimated_prompt_tokens"]
        assert est == sorted(est) and est == [t["prompt_tokens"] for t in conv]
        assert smeta["estimated_final_context"] <= CFG.worst_case_context() < 8192
    for f in meta["files"]:
        assert 0.8 * CFG.file_tokens <= f["file_tokens"] <= CFG.file_tokens
    assert turn_counts(trace) == [CFG.turns] * CFG.sessions
    assert meta["estimated_context_total"] == sum(s["estimated_final_context"] for s in meta["sessions"])
    assert pool_for_everything(trace) >= meta["estimated_context_total"]
    assert meta["shared_block_tokens_repeated"] == sum(
        f["block_tokens"] * (len(f["sessions"]) - 1) for f in meta["files"]
    )
    n = default_pool(trace, 0.125)
    largest = max(s["estimated_final_context"] for s in meta["sessions"])
    assert largest < 0.875 * n < 2 * largest < meta["estimated_context_total"]


@pytest.mark.parametrize(("field", "value", "match"), [
    ("sessions", 0, "sessions must be >= 1, got 0"), ("files", 0, "files must be >= 1, got 0"),
    ("files", 9, "files must be <= sessions"), ("turns", 0, "turns must be >= 1"),
    ("history_tokens", (600, 150), r"1 <= min <= max, got \(600, 150\)"),
    ("history_tokens", (0, 10), r"got \(0, 10\)"), ("file_tokens", 9000, "more than max_context 8192"),
])  # fmt: skip
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        SharedFilesConfig(**{field: value})


def test_entries_and_flags(capsys):
    cols = entries(("big", "kvtc+joint", "kvtc", "vanilla"), 3072, 20480, "j.safetensors")
    assert [(c.key, c.pool, c.backend) for c in cols] == [
        ("vanilla", 3072, "vanilla"),
        ("kvtc", 3072, "kvtc"),
        ("kvtc+joint", 3072, "kvtc"),
        ("big", 20480, "vanilla"),
    ]
    assert [c.flags() for c in cols] == [[], [], [JOINT_FLAG, "j.safetensors"], []]
    assert [c.key for c in entries(("kvtc", "kvtc+joint"), 3072, 20480, None)] == ["kvtc"]
    assert "kvtc+joint skipped" in capsys.readouterr().out
    for bad in ((), ("raw+host",)):
        with pytest.raises(ValueError, match="subset"):
            entries(bad, 3072, 20480, None)


def _summary(ttft: float, kv: dict[str, float] | None = None) -> dict:
    return {
        "requests": 12,
        "errors": 0,
        "ttft_mean": ttft,
        "prefilled_tokens": 5000,
        "server_prefill_tokens": 5000.0,
        "codec_s": None if kv is None else 1.5,
        "wall_s": 30.0,
        "kvtc": kv or {},
        "ttft_per_turn": [ttft, ttft],
        "loadavg_1m": [0.5, 1.0],
    }


def test_report_lists_joint_metrics(trace):
    kv = {
        "restored_tokens_total": 3000.0,
        "resident_tokens": 4000.0,
        "resident_bytes": 400_000.0,
        "compression_ratio": 17.0,
        "dropped_tokens_total": 0.0,
    }
    joint = {**kv, "joint_residual_tokens_total": 2400.0, "joint_reference_bytes": 70_000.0}
    summaries = {"vanilla": _summary(2.0), "kvtc": _summary(1.5, kv), "kvtc+joint": _summary(1.0, joint)}
    runs = [{**s, "runs": [s, {**s, "ttft_mean": s["ttft_mean"] * 1.1}]} for s in summaries.values()]
    report = {
        "trace_metadata": trace["metadata"],
        "summaries": dict(zip(summaries, runs, strict=True)),
        "config": {"concurrency": "1", "max_total_tokens": "3072", "store_fraction": "0.125", "runs": "2"},
        "columns": [{"kind": k, "key": k, "pool": 3072} for k in summaries],
    }
    assert joint_keys(report["summaries"]) == ["joint_reference_bytes", "joint_residual_tokens_total"]
    text = format_report(report)
    assert "| joint_residual_tokens_total | - | - | 4800 (2400, 2400) |" in text
    # the shared references count: (400,000 + 70,000) bytes over 4,000 compressed tokens
    row = "| bytes per compressed token (references included) | - | 100.0 (100.0, 100.0) | 117.5 (117.5, 117.5) |"
    assert row in text
    assert "| machine load (1-min) before / after | 0.5 / 1.0, 0.5 / 1.0 |" in text
    assert "0.50x (runs 0.50x, 0.50x; spread 0 points)" in text and "1.00x (reference)" in text
    assert (
        "joint_"
        not in format_report(
            {**report, "summaries": {k: summaries[k] for k in ("vanilla", "kvtc")}, "columns": report["columns"][:2]}
        ).split("Cells:")[0]
    )
