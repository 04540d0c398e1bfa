"""The off-GPU tiers through real SGLang servers (the stock ``sglang.launch_server`` on this CPU).

(a) One server with a host tier: a session whose KV was pushed out of the pool and out of the compressed store
comes back from host memory on its next turn (cached tokens in ``usage``, host hits on ``/metrics``). The
reference is the same server without the tier, where that turn recomputes the session.
(b) Two replicas sharing a real Mooncake store: a prefix served by one is restored on the other without prefill.
(c) A restart with the directory tier: a fresh server on the same directory restores the session's chunks
(a fresh server has nothing cached: every cached token came from the directory). At ``--tp-size 2`` (each rank
its own shard's objects, both ranks grafting alike after a restart) it is run with joint encoding in
``test_server_joint.py``, one server run for both.
(d) The Mooncake master killed under a serving replica and started again: misses, never a stuck server.
"""

from __future__ import annotations

import json
import time

import openai
import pytest
from mooncake_support import mooncake_master, requires_mooncake  # noqa: F401 (the fixture)
from serve_support import hf_model, kvtc_metrics, scheduler_errors, start

from kvtc_sglang.serve.launcher import ServerSpec
from kvtc_sglang.serve.server import SGLangServer
from kvtc_sglang.serve.workload import WorkloadConfig, _excerpts, chat

pytestmark = [pytest.mark.server, pytest.mark.model]

WL = WorkloadConfig(seed=11, max_tokens=4, timeout=300.0)
POOL = 2048
SESSIONS = 6  # each first turn ~700-900 tokens: session 0 leaves the pool, then the store (~1.5 sessions' blobs)
L3_SESSIONS = 3  # enough to push session 0 out of the pool (so it is encoded, and its chunks written)
TIER_FLAGS = ("--kvtc-store-fraction", "0.05", "--kvtc-window-tokens", "64")


def _server(calibration: str, log, flags: tuple[str, ...] = (), env: dict | None = None) -> SGLangServer:
    extra = ["--enable-cache-report", "--enable-metrics", "--disable-overlap-schedule", *TIER_FLAGS, *flags]
    return start(ServerSpec("kvtc", hf_model(), calibration, max_total_tokens=POOL, extra=extra), log, env=env)


def _client(srv: SGLangServer):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)


def _first_turns(srv: SGLangServer, sessions: int = SESSIONS) -> list[list[dict]]:
    """Every session's first turn, one at a time; returns the conversations (with the answers)."""
    client = _client(srv)
    files = _excerpts(WL.seed, sessions, 3000, "code")
    convs = [[{"role": "system", "content": f"You are agent #{i}."},
              {"role": "user", "content": f"Read this file:\n{f}"}] for i, f in enumerate(files)]  # fmt: skip
    for i, msgs in enumerate(convs):
        r = chat(client, "default", f"s{i}/t0", list(msgs), WL)
        assert not r.error, r.error
        msgs.append({"role": "assistant", "content": r.text or "(no answer)"})
        msgs.append({"role": "user", "content": "What does the first function do?"})
        msgs.insert(0, {"prompt_tokens": r.prompt_tokens})  # type: ignore[arg-type]
    return convs


def _next_turn(srv: SGLangServer, conv: list[dict]) -> tuple[int, int]:
    """``(the first turn's prompt tokens, this turn's cached tokens)``."""
    r = chat(_client(srv), "default", "s0/t1", conv[1:], WL)
    assert not r.error, r.error
    return int(conv[0]["prompt_tokens"]), r.cached_tokens


def _metrics_once(srv: SGLangServer, key: str, at_least: float, timeout: float = 15.0) -> dict:
    """``/metrics``' kvtc counters once ``key`` reached ``at_least`` (or at ``timeout``): kvtc updates them at most
    once a second, at a scheduler tick, so a read right after a response may predate its counts."""
    end = time.monotonic() + timeout
    while True:
        m = kvtc_metrics(srv)
        if m.get(key, 0) >= at_least or time.monotonic() > end:
            return m
        time.sleep(0.5)


def _run(calibration: str, log, flags: tuple[str, ...] = ()) -> tuple[int, int, dict, str]:
    srv = _server(calibration, log, flags)
    try:
        convs = _first_turns(srv)
        prompt, cached = _next_turn(srv, convs[0])
        metrics = _metrics_once(srv, "restored_tokens_total", 1)
    finally:
        srv.stop()
    return prompt, cached, metrics, srv.log_text()


def test_a_session_pushed_out_of_pool_and_store_comes_back_from_host_memory(artifact_path, tmp_path):
    prompt, cached_without, m_without, log = _run(str(artifact_path), tmp_path / "none.log")
    assert not scheduler_errors(log)
    assert m_without.get("host_hits_total", 0) == 0 and m_without.get("dropped_tokens_total", 0) > 0
    prompt, cached_with, m_with, log = _run(str(artifact_path), tmp_path / "host.log", ("--kvtc-host-bytes", "256M"))
    assert not scheduler_errors(log)
    seen = {k: v for k, v in m_with.items() if v}
    assert m_with["host_demotions_total"] > 0 and m_with["host_hits_total"] >= 1, seen
    assert m_with["host_hit_tokens_total"] >= prompt // 2, seen
    assert cached_with >= prompt - 200 > cached_without, seen  # restored, not recomputed (sinks/window aside)
    assert "#host-hit-token" in log


def _restart_on_directory(calibration: str, tmp_path, tp: tuple[str, ...] = (), env: dict | None = None):
    """First turns, kill, a fresh server on the same directory, session 0's next turn; returns ``(metrics before
    the kill, prompt tokens, cached tokens, metrics after, log after)``."""
    config = json.dumps({"path": str(tmp_path / "l3"), "chunk_tokens": 256})
    flags = ("--kvtc-host-bytes", "256M", "--kvtc-l3", "directory", "--kvtc-l3-config", config, *tp)
    srv = _server(calibration, tmp_path / "before.log", flags, env)
    try:
        convs = _first_turns(srv, L3_SESSIONS)
        written = _metrics_once(srv, "l3_put_objects_total", 2)
    finally:
        srv.stop()
    assert not scheduler_errors(srv.log_text())
    assert written.get("l3_put_objects_total", 0) >= 2, {k: v for k, v in written.items() if v}
    srv = _server(calibration, tmp_path / "after.log", flags, env)  # the restart: an empty tree
    try:
        prompt, cached = _next_turn(srv, convs[0])
        m = _metrics_once(srv, "restored_tokens_total", 256)
    finally:
        srv.stop()
    return written, prompt, cached, m, srv.log_text()


def test_a_restarted_server_restores_from_the_directory_tier(artifact_path, tmp_path):
    _, _, cached, m, log = _restart_on_directory(str(artifact_path), tmp_path)
    seen = {k: v for k, v in m.items() if v}
    assert not scheduler_errors(log)
    assert m["l3_hit_tokens_total"] >= 256 and m["restored_tokens_total"] >= 256, seen
    assert cached >= 256, seen  # a fresh server's cache is empty: these came from the directory


@requires_mooncake
def test_a_prefix_served_by_one_replica_is_restored_on_another_through_mooncake(
    artifact_path, tmp_path, mooncake_master  # noqa: F811 (the fixture)
):
    """(b) Two replicas sharing a real Mooncake store (the master started by the fixture): replica A serves the
    sessions (its encodes write whole chunks), replica B, which never saw them, restores session 0's prefix."""
    config = json.dumps({"master_server_address": mooncake_master.address, "chunk_tokens": 256,
                         "global_segment_size": "256mb", "local_buffer_size": "64mb"})  # fmt: skip
    flags = ("--kvtc-host-bytes", "256M", "--kvtc-l3", "mooncake", "--kvtc-l3-config", config)
    a = _server(str(artifact_path), tmp_path / "a.log", flags)
    try:
        b = _server(str(artifact_path), tmp_path / "b.log", flags)
        try:
            convs = _first_turns(a, L3_SESSIONS)
            written = _metrics_once(a, "l3_put_objects_total", 2)
            prompt, cached = _next_turn(b, convs[0])
            m = _metrics_once(b, "restored_tokens_total", 256)
        finally:
            b.stop()
    finally:
        a.stop()
    assert written.get("l3_put_objects_total", 0) >= 2, {k: v for k, v in written.items() if v}
    seen = {k: v for k, v in m.items() if v}
    assert not scheduler_errors(a.log_text()) and not scheduler_errors(b.log_text())
    assert m["l3_hit_tokens_total"] >= 256 and m["restored_tokens_total"] >= 256, seen
    assert cached >= 256, seen  # B never served this session: these came from A through Mooncake
    assert prompt > cached


@requires_mooncake
def test_a_dead_then_restarted_master_costs_misses_never_a_stuck_server(
    artifact_path, tmp_path, mooncake_master  # noqa: F811 (the fixture)
):
    """(d) The real Mooncake master killed under a serving replica: every request is answered (a request held
    back for its prefetch goes on at its deadline; writes fail on the writer thread) and the counters name the
    misses; once the master is back on its port, the replica writes again."""
    config = json.dumps({"master_server_address": mooncake_master.address, "chunk_tokens": 256,
                         "prefetch_timeout_s": 2, "global_segment_size": "256mb", "local_buffer_size": "64mb"})
    flags = ("--kvtc-host-bytes", "256M", "--kvtc-l3", "mooncake", "--kvtc-l3-config", config)
    srv = _server(str(artifact_path), tmp_path / "dead.log", flags)
    try:
        mooncake_master.kill()
        _first_turns(srv, L3_SESSIONS)  # every request answered (each one asserts it had no error)
        dead = _metrics_once(srv, "l3_put_failed_total", 1, timeout=60)
        mooncake_master.start()  # the same port: the client reconnects by itself
        time.sleep(3)
        _first_turns(srv, SESSIONS)  # 3 new sessions push more KV out: new chunks to write
        back = _metrics_once(srv, "l3_put_objects_total", 1, timeout=60)
    finally:
        srv.stop()
    assert not scheduler_errors(srv.log_text())
    seen = {k: v for k, v in dead.items() if v}
    misses = dead.get("l3_put_failed_total", 0) + dead.get("l3_put_dropped_total", 0)
    assert misses >= 1 and dead.get("l3_put_objects_total", 0) == 0, seen
    assert dead.get("l3_prefetch_timeouts_total", 0) + dead.get("l3_get_errors_total", 0) >= 1, seen
    assert back["l3_put_objects_total"] >= 1, {k: v for k, v in back.items() if v}
