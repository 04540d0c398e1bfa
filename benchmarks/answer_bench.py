"""Answers through the stock SGLang server from restored KV: long documents read once, compressed while cold,
then asked about (issue 32).

Each document (real prose or code, 2-6k tokens, with RULER-style facts placed in it: ``kvtc_sglang.eval.answers``)
is read in a first turn; the other documents' first turns follow, so on kvtc's pool (too small to keep them all
uncompressed) every document but the last goes cold and is transform-coded. Then the questions, round robin over
the documents (each question's document has gone cold again since its last turn), greedy, 16 tokens. Vanilla runs
on a pool that holds everything (its KV is exact: the reference); kvtc runs once per ratio. Every answer's prompt
tokens taken from the cache and restored from blobs are read from the server (``cached_tokens``, the
``sglang:kvtc_restored_tokens_total`` counter around each request; the counter moves at the scheduler's step, so
a restore can show on the next request's reading: the total is exact, the split per answer may lag by one).

    .venv/bin/python benchmarks/answer_bench.py --model-path artifacts/hf/qwen2.5-coder-0.5b \\
        --artifacts out/joint/cal --ratios 16 20 32 --json benchmarks/results/answers_qwen25.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import AutoTokenizer

from kvtc_sglang.calibration.fit import artifact_name
from kvtc_sglang.eval.answers import LAYOUTS, TASKS, AnswerDocument, build_document, exact_match, f1
from kvtc_sglang.serve.launcher import ServerSpec
from kvtc_sglang.serve.server import SGLangServer
from kvtc_sglang.serve.server_metrics import server_counters


@dataclass(frozen=True)
class AnswerConfig:
    documents: int = 6  # alternately prose and code
    doc_tokens: int = 3000
    kvtc_pool: int = 4096  # --max-total-tokens of kvtc: one document and a question, not every document raw
    vanilla_pool: int = 65536  # holds every document uncompressed: the exact reference
    store_fraction: float = 0.25
    max_tokens: int = 16
    seed: int = 0
    start_timeout: float = 600.0
    layout: str = "turns"  # see kvtc_sglang.eval.answers.LAYOUTS

    def __post_init__(self) -> None:
        if self.documents < 2 or self.doc_tokens < 1000:
            raise ValueError(f"need >= 2 documents of >= 1000 tokens, got {self.documents} of {self.doc_tokens}")
        if self.kvtc_pool >= self.documents * self.doc_tokens:
            raise ValueError(f"kvtc_pool {self.kvtc_pool} holds every document raw: nothing would be compressed")


def make_documents(model_path: str, cfg: AnswerConfig) -> list[AnswerDocument]:
    tok = AutoTokenizer.from_pretrained(model_path)

    def count(text: str) -> int:
        return len(tok(text)["input_ids"])

    kinds = ("prose", "code")
    return [build_document(kinds[i % 2], skip=(i // 2) * 3, tokens=cfg.doc_tokens, count_tokens=count, seed=cfg.seed)
            for i in range(cfg.documents)]


def chat(srv: SGLangServer, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, dict]:
    body = {"model": "default", "messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
    status, text = srv.post("/v1/chat/completions", body, timeout=900.0)
    if status != 200:
        raise RuntimeError(f"chat completion answered {status} (expected 200): {text[:300]}")
    out = json.loads(text)
    return out["choices"][0]["message"]["content"] or "", out.get("usage") or {}


def restored(srv: SGLangServer) -> float:
    return server_counters(srv.get("/metrics")[1]).kvtc.get("restored_tokens_total", 0.0)


def run_server(label: str, spec: ServerSpec, docs: list[AnswerDocument], cfg: AnswerConfig, logs: Path) -> dict:
    """First turns of every document, then every question round robin; answers with their cache figures."""
    answers = []
    t0 = time.perf_counter()
    with SGLangServer(spec, logs / f"{label}.log", start_timeout=cfg.start_timeout) as srv:
        for doc in docs:
            chat(srv, doc.messages(layout=cfg.layout), 1)
        rounds = max(len(d.questions) for d in docs)
        for q in range(rounds):
            for i, doc in enumerate(docs):
                if q >= len(doc.questions):
                    continue
                question = doc.questions[q]
                before = restored(srv)
                text, usage = chat(srv, doc.messages(question, cfg.layout), cfg.max_tokens)
                details = usage.get("prompt_tokens_details") or {}
                answers.append({"document": i, "task": question.task, "answer": question.answer, "prediction": text,
                                "exact": exact_match(text, question.answer), "f1": f1(text, question.answer),
                                "prompt_tokens": usage.get("prompt_tokens"),
                                "cached_tokens": details.get("cached_tokens"),
                                "restored_tokens": restored(srv) - before})
        metrics = server_counters(srv.get("/metrics")[1])
    return {"label": label, "answers": answers, "seconds": round(time.perf_counter() - t0, 1),
            "prefill_tokens": metrics.prefill_tokens, "kvtc": metrics.kvtc}


def summarize(run: dict, reference: dict | None) -> dict:
    """Accuracy per task and overall; with a reference run, the share of answers identical to it."""
    out: dict = {}
    for task in (*TASKS, "all"):
        rows = [a for a in run["answers"] if task in ("all", a["task"])]
        if not rows:
            continue
        out[task] = {"n": len(rows), "exact": sum(a["exact"] for a in rows) / len(rows),
                     "f1": sum(a["f1"] for a in rows) / len(rows)}
        if reference is not None:
            ref = [a for a in reference["answers"] if task in ("all", a["task"])]
            same = sum(a["prediction"].strip() == b["prediction"].strip() for a, b in zip(rows, ref, strict=True))
            out[task]["identical"] = same / len(rows)
    answered_from_blobs = [a for a in run["answers"] if a["restored_tokens"] > 0]
    out["restored"] = {"answers_with_restored_tokens": len(answered_from_blobs), "answers": len(run["answers"]),
                       "restored_tokens": sum(a["restored_tokens"] for a in run["answers"]),
                       "prompt_tokens": sum(a["prompt_tokens"] or 0 for a in run["answers"])}
    return out


def markdown(report: dict) -> str:
    """One row per server: exact match per task (answers identical to vanilla's), overall F1, restored share."""
    tasks = [t for t in (*TASKS, "all") if t in next(iter(report["summary"].values()))]
    lines = ["| server | " + " | ".join(f"{t}: exact (same)" for t in tasks) + " | F1 | answers from blobs | "
             "prompt tokens restored |", "|---" * (len(tasks) + 4) + "|"]
    for label, s in report["summary"].items():
        cells = [f"{100 * s[t]['exact']:.0f}%" + (f" ({100 * s[t]['identical']:.0f}%)" if "identical" in s[t] else "")
                 for t in tasks]
        r = s["restored"]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {s['all']['f1']:.3f} | "
                     f"{r['answers_with_restored_tokens']}/{r['answers']} | "
                     f"{100 * r['restored_tokens'] / max(1, r['prompt_tokens']):.1f}% |")
    n = {t: next(iter(report["summary"].values()))[t]["n"] for t in tasks}
    return "\n".join(lines) + "\n\nquestions: " + ", ".join(f"{t} {k}" for t, k in n.items())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", help="HF export of the model (kvtc_sglang.serve.export)")
    p.add_argument("--artifacts", type=Path, help="folder with <model>.r<ratio>.kvtc.safetensors")
    p.add_argument("--ratios", type=float, nargs="+", default=[16.0, 20.0, 32.0])
    p.add_argument("--documents", type=int, default=AnswerConfig.documents)
    p.add_argument("--doc-tokens", type=int, default=AnswerConfig.doc_tokens)
    p.add_argument("--kvtc-pool", type=int, default=AnswerConfig.kvtc_pool)
    p.add_argument("--layout", choices=LAYOUTS, default=AnswerConfig.layout,
                   help="the document as a first turn, or as a long system prompt each question's user shares")
    p.add_argument("--logs", type=Path, default=Path("out/answers"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--table", type=Path, default=None, help="print the table of an earlier run's JSON and stop")
    args = p.parse_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())))
        return
    if args.model_path is None or args.artifacts is None:
        p.error("a run needs --model-path and --artifacts")
    cfg = AnswerConfig(documents=args.documents, doc_tokens=args.doc_tokens, kvtc_pool=args.kvtc_pool,
                       layout=args.layout)
    docs = make_documents(args.model_path, cfg)
    name = Path(args.model_path).name
    flags = ["--enable-cache-report", "--enable-metrics", "--disable-overlap-schedule"]
    runs = [run_server("vanilla", ServerSpec("vanilla", args.model_path, max_total_tokens=cfg.vanilla_pool,
                                             extra=flags), docs, cfg, args.logs)]
    for ratio in args.ratios:
        cal = str(args.artifacts / artifact_name(name, ratio))
        spec = ServerSpec("kvtc", args.model_path, cal, max_total_tokens=cfg.kvtc_pool,
                          extra=[*flags, "--kvtc-store-fraction", str(cfg.store_fraction)])
        runs.append(run_server(f"kvtc r{ratio:g}", spec, docs, cfg, args.logs))
    report = {"model": name, "config": asdict(cfg), "documents": [d.name for d in docs],
              "summary": {r["label"]: summarize(r, runs[0] if r is not runs[0] else None) for r in runs}, "runs": runs}
    print(markdown(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
