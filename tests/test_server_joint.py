"""Joint encoding through the real SGLang server (``--kvtc-joint-calibration``): three agents read the same real
file after different histories (so at different offsets, in different radix branches) on a pool too small for
them; each comes back for a second turn, restored from blobs. The second copy of the file makes the shared
reference, later copies are residuals against it, and the follow-ups restore from them, as ``/metrics`` says.
One run, at tp 2 with the directory tier and a restart: what tp 1 does, plus the ranks' agreement and the
references' objects, in one run to keep CI short (tp 1 is run by the cache tests on SGLang's real RadixCache,
``test_joint_cache.py`` and ``test_l3_joint.py``, and by the joint benchmark)."""

from __future__ import annotations

import json
import time

import openai
import pytest
from serve_support import hf_model, kvtc_metrics, scheduler_errors, start

from kvtc_sglang.cache.report import parse_line
from kvtc_sglang.serve.launcher import ServerSpec
from kvtc_sglang.serve.workload import WorkloadConfig, _excerpts, chat

pytestmark = [pytest.mark.server, pytest.mark.model]

WL = WorkloadConfig(seed=3, conversations=3, turns=2, tool_chars=600, concurrency=1, max_tokens=8, timeout=300.0)
POOL = 2048  # three ~1.1k-token sessions do not fit: each goes cold and is compressed before its second turn


def _serve(joint_path, artifact_path, log, flags: tuple[str, ...] = (), env: dict | None = None):
    """Three agents read one file after different histories, turn-major: ``(results, rank 0's metrics, log,
    the conversations)``."""
    file = _excerpts(7, 1, 2600, "code")[0]
    histories = _excerpts(11, 3, 1800, "prose")
    convs = [[{"role": "system", "content": f"Session {s}: you are a coding agent in repository r{s}."},
              {"role": "user", "content": f"Earlier notes:\n{histories[s][: 500 + 400 * s]}\n\n"
                                          f"Tool output of read_file('lib/util.py'):\n{file}\nWhat next?"}]
             for s in range(3)]  # fmt: skip
    srv = _start(joint_path, artifact_path, log, flags, env)
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
    return results, m, srv.log_text(), convs


def _start(joint_path, artifact_path, log, flags: tuple[str, ...], env: dict | None = None):
    extra = ["--enable-metrics", "--disable-overlap-schedule", "--kvtc-joint-calibration", str(joint_path),
             "--kvtc-ready-fraction", "0.9", *flags]
    return start(ServerSpec("kvtc", hf_model(), str(artifact_path), max_total_tokens=POOL, extra=extra), log, env=env)


def _check_served(results, m, log) -> None:
    assert not scheduler_errors(log), scheduler_errors(log)
    assert all(not r.error and r.text.strip() for r in results), [r.error for r in results]
    assert m["joint_references_made_total"] >= 1, m
    assert m["joint_restored_tokens_total"] > 0, m  # a follow-up came back through a residual and its reference
    assert m["checksum_failures_total"] == 0 and m["restore_failures_total"] == 0, m


def test_shared_file_through_one_reference_at_tp2_and_from_the_directory_tier(joint_path, artifact_path, tmp_path):
    """At ``--tp-size 2`` each rank codes its own KV heads against its own reference blobs (its rank's residual
    calibration); the ranks' reference and residual sizes differ, so the store reserves the larger of each on both
    ranks (:func:`~kvtc_sglang.cache.ranks.agree_encodes`) and the trees stay equal (SGLang's consensus checker and
    kvtc's decision digest both on). With the L3 tier (a directory, write-through) the residuals' chunks name their
    reference, written once as an object of its own, each rank its own shard's objects (its keys name its rank); a
    restarted server (empty trees and books) takes the third agent's next turn from the directory: both ranks fetch
    their chunks, then the references they name, and graft alike, restored without prefill."""
    tp = ("--tp-size", "2", "--kvtc-host-bytes", "256M", "--kvtc-l3", "directory", "--kvtc-l3-config",
          json.dumps({"path": str(tmp_path / "l3"), "chunk_tokens": 128}))  # fmt: skip
    env = {"SGLANG_ENABLE_RANK_CONSENSUS_CHECKER": "1"}
    results, m, log, convs = _serve(joint_path, artifact_path, tmp_path / "server.log", tp, env)
    _check_served(results, m, log)
    assert m["l3_references_written_total"] >= 1 and m["l3_put_objects_total"] >= 4, m
    files = [p for p in (tmp_path / "l3").rglob("*") if p.is_file() and not p.name.startswith(".tmp-")]
    assert len({p.read_bytes()[8:24] for p in files}) == 2, len(files)  # frame digest tags: each rank its shard
    assert ("residual calibration residual.tp2-rank1.safetensors against smollm2-135m-instruct.r16.tp2-rank1"
            ".kvtc.safetensors") in log
    _ranks_alike(log)
    srv = _start(joint_path, artifact_path, tmp_path / "restart.log", tp, env)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        r = chat(client, "default", "s2/t2", [*convs[2], {"role": "user", "content": "And which one last?"}], WL)
        time.sleep(1.5)  # kvtc mirrors its counters at a scheduler tick, at most once a second
        chat(client, "default", "probe", [{"role": "user", "content": "Hi"}], WL)
        m2 = kvtc_metrics(srv)
    finally:
        srv.stop()
    log2 = srv.log_text()
    assert not r.error and r.text.strip() and not scheduler_errors(log2), r.error
    assert m2["joint_references_fetched_total"] >= 1 and m2["l3_hit_tokens_total"] >= 512, m2
    assert m2["joint_restored_tokens_total"] > 0 and m2["restored_tokens_total"] >= 512, m2
    assert m2["checksum_failures_total"] == 0 and m2["restore_failures_total"] == 0, m2
    _ranks_alike(log2)


def _ranks_alike(log: str) -> None:
    assert "Found rank divergence" not in log and "ranks' radix trees diverged" not in log
    lines = {}
    for line in log.splitlines():
        for rank in ("TP0", "TP1"):
            if "KVTC cache. " in line and f" {rank}]" in line:
                lines[rank] = parse_line(line)
    assert set(lines) == {"TP0", "TP1"}, "each rank logs its KVTC cache line"
    for counter in ("#compression", "#restore", "#restored-token", "#dropped-token"):
        assert lines["TP0"][counter] == lines["TP1"][counter], (counter, lines)
