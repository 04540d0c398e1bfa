"""The answer benchmark's parts (issue 32): the scorer against hand-worked cases, documents that hold the facts
they are asked about, and one real kvtc server answering from restored KV (benchmarks/answer_bench.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kvtc_sglang.eval.answers import TASKS, build_document, exact_match, f1

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def f1_ref(prediction: list[str], answer: list[str]) -> float:
    """Reference: token F1 by counting each answer word's overlap by hand."""
    common = sum(min(prediction.count(w), answer.count(w)) for w in set(answer))
    if common == 0:
        return 0.0
    p, r = common / len(prediction), common / len(answer)
    return 2 * p * r / (p + r)


@pytest.mark.parametrize(
    ("prediction", "answer", "exact", "words"),
    [
        ("The code is 5348726.", "5348726", True, (["the", "code", "is", "5348726"], ["5348726"])),
        ("53487261", "5348726", False, (["53487261"], ["5348726"])),  # a number inside a longer one is not it
        ("  THE First, statement in!", "the first statement in", True,
         (["the", "first", "statement", "in"], ["the", "first", "statement", "in"])),
        ("first statement", "the first statement in", False,
         (["first", "statement"], ["the", "first", "statement", "in"])),
        ("", "5348726", False, ([], ["5348726"])),
    ],
)
def test_the_scorer_matches_whole_words_and_counts_f1(prediction, answer, exact, words) -> None:
    assert exact_match(prediction, answer) is exact
    assert f1(prediction, answer) == pytest.approx(f1_ref(*words) if words[0] else 0.0)


@pytest.mark.parametrize(("kind", "skip"), [("prose", 0), ("code", 3)])
def test_a_document_holds_every_fact_it_is_asked_about(kind: str, skip: int) -> None:
    doc = build_document(kind, skip, tokens=1500, count_tokens=lambda t: len(t.split()), seed=1)
    assert sorted({q.task for q in doc.questions}) == sorted(TASKS)
    for q in doc.questions:
        if q.task == "span":
            quote = q.prompt.split('"')[1]
            assert doc.text.count(quote) == 1 and f"{quote} {q.answer}" in " ".join(doc.text.split())
        elif q.task == "variable-tracking":
            var = q.prompt.split("VAR ")[1].split()[0]
            chain = [line for line in doc.text.splitlines() if line.startswith("VAR ")]
            assert len(chain) == 3 and chain[0].endswith(f"= {q.answer}.") and chain[2].startswith(f"VAR {var} =")
        else:
            assert q.answer in doc.text and doc.text.count(q.answer) == 1
    assert doc.messages(doc.questions[0])[0] == doc.messages()[0]  # a question's turn extends the first turn
    assert doc.messages(doc.questions[0], "system")[0] == doc.messages(layout="system")[0]  # one system prompt
    with pytest.raises(ValueError, match="layout"):
        doc.messages(layout="tools")


def test_identical_answers_are_counted_against_the_reference() -> None:
    from answer_bench import summarize

    def run(preds: list[str]) -> dict:
        return {"answers": [{"task": "needle", "prediction": p, "exact": p == "1", "f1": float(p == "1"),
                             "restored_tokens": 5.0 * i, "prompt_tokens": 10} for i, p in enumerate(preds)]}

    s = summarize(run(["1", "2", "1 "]), run(["1", "1", "1"]))
    assert s["needle"] == {"n": 3, "exact": pytest.approx(1 / 3), "f1": pytest.approx(1 / 3),
                           "identical": pytest.approx(2 / 3)}
    assert s["restored"]["answers_with_restored_tokens"] == 2 and s["restored"]["restored_tokens"] == 15


@pytest.mark.server
@pytest.mark.model
def test_answers_come_from_restored_kv_on_a_real_kvtc_server(artifact_path, tmp_path) -> None:
    """Three documents of about 900 tokens on a pool of 1,500: every document but the last is compressed after its
    first turn, and every question is answered from KV restored from blobs (the server's counter)."""
    from answer_bench import AnswerConfig, make_documents, run_server, summarize
    from serve_support import hf_model

    from kvtc_sglang.serve.launcher import ServerSpec

    cfg = AnswerConfig(documents=3, doc_tokens=1000, kvtc_pool=1500, max_tokens=4)
    model = hf_model()
    docs = make_documents(model, cfg)
    spec = ServerSpec("kvtc", model, str(artifact_path), max_total_tokens=cfg.kvtc_pool,
                      extra=["--enable-cache-report", "--enable-metrics", "--disable-overlap-schedule",
                             "--kvtc-store-fraction", "0.25"])
    run = run_server("kvtc", spec, docs, cfg, tmp_path)
    assert len(run["answers"]) == sum(len(d.questions) for d in docs)
    s = summarize(run, None)
    cached = [(a["cached_tokens"], a["restored_tokens"]) for a in run["answers"]]
    # every answer reused its document (SGLang's own per-request count) ...
    assert all(c and c >= 800 for c, _ in cached), cached
    # ... and on a pool that holds one document, round robin brought each one back from its blobs. The counter is
    # read around each request but moves at the scheduler's step, so one request's restore can show on the next:
    # the total is exact, the split per answer is not.
    assert s["restored"]["restored_tokens"] >= 500 * len(cached), cached
    assert run["kvtc"]["restored_tokens_total"] >= 500 * len(cached)
    assert run["kvtc"]["restored_tokens_total"] >= 2 * 900
