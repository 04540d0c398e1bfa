"""Joint encoding through the real SGLang server (``--kvtc-joint-calibration``): three agents read the same real
file after different histories (so at different offsets, in different radix branches) on a pool too small for
them; each comes back for a second turn, restored from blobs. The second copy of the file makes the shared
reference, later copies are residuals against it, and the follow-ups restore from them, as ``/metrics`` says."""

from __future__ import annotations

import openai
import pytest
from serve_support import hf_model, kvtc_metrics, scheduler_errors, start

from kvtc_sglang.serve.launcher import ServerSpec
from kvtc_sglang.serve.workload import WorkloadConfig, _excerpts, chat

pytestmark = [pytest.mark.server, pytest.mark.model]

WL = WorkloadConfig(seed=3, conversations=3, turns=2, tool_chars=600, concurrency=1, max_tokens=8, timeout=300.0)
POOL = 2048  # three ~1.1k-token sessions do not fit: each goes cold and is compressed before its second turn


def test_shared_file_served_through_one_reference(joint_path, artifact_path, tmp_path):
    file = _excerpts(7, 1, 2600, "code")[0]
    histories = _excerpts(11, 3, 1800, "prose")
    convs = [[{"role": "system", "content": f"Session {s}: you are a coding agent in repository r{s}."},
              {"role": "user", "content": f"Earlier notes:\n{histories[s][: 500 + 400 * s]}\n\n"
                                          f"Tool output of read_file('lib/util.py'):\n{file}\nWhat next?"}]
             for s in range(3)]  # fmt: skip
    extra = ["--enable-metrics", "--disable-overlap-schedule", "--kvtc-joint-calibration", str(joint_path),
             "--kvtc-ready-fraction", "0.9"]
    srv = start(ServerSpec("kvtc", hf_model(), str(artifact_path), max_total_tokens=POOL, extra=extra),
                tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        results = []
        for turn in range(2):  # turn-major: every session's turn 1, then every session's turn 2
            for s, msgs in enumerate(convs):
                if turn:
                    msgs.append({"role": "user", "content": "Which function would you test first?"})
                r = chat(client, "default", f"s{s}/t{turn}", list(msgs), WL)
                msgs.append({"role": "assistant", "content": r.text or "(no answer)"})
                results.append(r)
        m = kvtc_metrics(srv)
    finally:
        srv.stop()
    log = srv.log_text()
    assert not scheduler_errors(log), scheduler_errors(log)
    assert all(not r.error and r.text.strip() for r in results), [r.error for r in results]
    assert m["joint_references_made_total"] >= 1, m
    assert m["joint_residual_tokens"] + m["joint_restored_tokens_total"] > 0, m
    assert m["joint_restored_tokens_total"] > 0, m  # a follow-up came back through a residual and its reference
    assert m["checksum_failures_total"] == 0 and m["restore_failures_total"] == 0, m
