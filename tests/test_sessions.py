"""The agentic trace generator: deterministic, real text, sizes within bounds, accepted by SGLang's own loader."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
from serve_support import hf_model

from kvtc_sglang.calibration.corpus import documents
from kvtc_sglang.serve.sessions import (
    Tokens,
    TraceConfig,
    load_trace,
    make_trace,
    pool_for_everything,
    turn_counts,
    write_trace,
)

CFG = TraceConfig(seed=3, sessions=5, turns=3, first_read_tokens=(1500, 2500), tool_tokens=(200, 400),
                  output_tokens=16, concurrency=2)


@pytest.fixture(scope="module")
def model_dir() -> str:
    return hf_model()


@pytest.fixture(scope="module")
def trace(model_dir: str) -> dict:
    return make_trace(CFG, model_dir)


def _body(content: str) -> str:
    """The excerpt inside a turn's message: after the tool line, before the trailing question."""
    body = content.split(":\n", 1)[1]
    return body.removesuffix("\nWhat next?")


def test_deterministic_and_seeded(trace, model_dir):
    again = make_trace(CFG, model_dir)
    assert json.dumps(again) == json.dumps(trace)
    other = make_trace(TraceConfig(**{**CFG.__dict__, "seed": 4}), model_dir)
    assert other["conversations"] != trace["conversations"]


def test_text_is_real_corpus_text(trace):
    corpus = [d.text for kind in ("code", "prose") for d in documents("evaluation", kind)]
    bodies = [_body(m["content"]) for conv in trace["conversations"] for turn in conv for m in turn["messages"]
              if m["role"] == "user"]
    assert len(bodies) == CFG.sessions * CFG.turns
    for body in bodies:
        assert len(body) > 200 and any(body in text for text in corpus), body[:200]
    firsts = [conv[0]["messages"][1]["content"] for conv in trace["conversations"]]
    assert len(set(firsts)) == CFG.sessions  # every session reads its own file


def test_sizes_within_bounds(trace, model_dir):
    tok = Tokens(model_dir)
    meta = trace["metadata"]
    assert turn_counts(trace) == [CFG.turns] * CFG.sessions
    for conv, smeta in zip(trace["conversations"], meta["sessions"], strict=True):
        first = _body(conv[0]["messages"][1]["content"])
        assert 0.8 * CFG.first_read_tokens[0] <= tok.count(first) <= CFG.first_read_tokens[1]
        for turn in conv[1:]:
            n = tok.count(_body(turn["messages"][0]["content"]))
            assert 0.8 * CFG.tool_tokens[0] <= n <= CFG.tool_tokens[1]
        est = smeta["estimated_prompt_tokens"]
        assert est == sorted(est) and est == [t["prompt_tokens"] for t in conv]  # contexts grow every turn
        assert CFG.first_read_tokens[0] * 0.8 < smeta["estimated_final_context"] <= CFG.worst_case_context()
    assert meta["estimated_context_total"] == sum(s["estimated_final_context"] for s in meta["sessions"])
    assert pool_for_everything(trace) >= meta["estimated_context_total"]


def test_prompt_estimate_matches_the_chat_template(trace, model_dir):
    from transformers import AutoTokenizer

    tk = AutoTokenizer.from_pretrained(model_dir)
    history: list[dict] = []
    for t, turn in enumerate(trace["conversations"][0]):
        if t:
            history.append({"role": "assistant", "content": "x " * CFG.output_tokens})
        history += turn["messages"]
        ids = tk.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        n = len(ids["input_ids"] if hasattr(ids, "keys") else ids)
        assert abs(n - turn["prompt_tokens"]) <= 10


def test_sglang_loader_accepts_the_trace(trace, tmp_path, model_dir):
    from sglang.benchmark.datasets import get_dataset
    from sglang.benchmark.serving import _normalize_round_messages

    path = tmp_path / "trace.json"
    write_trace(CFG, model_dir, path)
    assert load_trace(path)["conversations"] == trace["conversations"]
    args = Namespace(dataset_name="agentic-trace", dataset_path=str(path), num_prompts=CFG.sessions,
                     sharegpt_output_len=CFG.output_tokens, dataset_offset=0, agentic_max_turns=None)
    rows = get_dataset(args, tokenizer=None)
    assert len(rows) == CFG.sessions
    for row, conv in zip(rows, trace["conversations"], strict=True):
        assert row.output_len == CFG.output_tokens and len(row.prompt) == CFG.turns
        assert all(_normalize_round_messages(r) == t["messages"] for r, t in zip(row.prompt, conv, strict=True))


def test_config_is_checked():
    with pytest.raises(ValueError, match="more than max_context 8192"):
        TraceConfig(turns=12, first_read_tokens=(3000, 4000), tool_tokens=(300, 400))
    with pytest.raises(ValueError, match=r"tool_tokens must be \(min, max\)"):
        TraceConfig(tool_tokens=(400, 200))
    with pytest.raises(ValueError, match="sessions must be >= 1, got 0"):
        TraceConfig(sessions=0)


def test_load_trace_refuses_other_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"conversations": []}))
    with pytest.raises(ValueError, match="non-empty 'conversations'"):
        load_trace(path)


def test_shared_prompt_sends_each_prompts_first_user_before_the_rest(monkeypatch):
    """Cached tokens must not depend on batching: every prompt's first user completes before its other users
    are sent (two users of an unsent prompt in one batch would both prefill it)."""
    import threading

    from kvtc_sglang.serve import workload

    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def recording_chat(client, model, key, messages, cfg):
        with lock:
            events.append(("start", key))
        with lock:
            events.append(("end", key))
        return workload.RequestResult(key, text="ok")

    monkeypatch.setattr(workload, "chat", recording_chat)
    cfg = workload.WorkloadConfig(users=8, system_prompts=3)
    run = workload.run_shared_prompt(None, "default", cfg, lambda: None)
    keys = [r.key for r in run.results]
    assert keys == [f"shared/u{u}/{k.split('/')[-1]}" for u, k in enumerate(keys)]  # results in user order
    prompts = {k.split("/")[-1] for k in keys}
    firsts = {p: next(k for k in keys if k.endswith("/" + p)) for p in prompts}
    last_first_end = max(i for i, (e, k) in enumerate(events) if e == "end" and k in firsts.values())
    first_rest_start = min(i for i, (e, k) in enumerate(events) if e == "start" and k not in firsts.values())
    assert len(prompts) > 1 and len(keys) > len(prompts)
    assert last_first_end < first_rest_start
