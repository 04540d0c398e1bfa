"""The off-GPU tiers through real SGLang servers (the stock ``sglang.launch_server`` on this CPU).

(a) One server with a host tier: a session whose KV was pushed out of the pool and out of the compressed store
comes back from host memory on its next turn (cached tokens in ``usage``, host hits on ``/metrics``). The
reference is the same server without the tier, where that turn recomputes the session.
"""

from __future__ import annotations

import openai
import pytest
from serve_support import hf_model, kvtc_metrics, scheduler_errors, start

from kvtc_sglang.serve.launcher import ServerSpec
from kvtc_sglang.serve.workload import WorkloadConfig, _excerpts, chat

pytestmark = [pytest.mark.server, pytest.mark.model]

WL = WorkloadConfig(seed=11, max_tokens=4, timeout=300.0)
POOL = 2048
SESSIONS = 6  # each first turn ~700-900 tokens: session 0 leaves the pool, then the store (~1.5 sessions' blobs)
TIER_FLAGS = ("--kvtc-store-fraction", "0.05", "--kvtc-window-tokens", "64")


def _sessions(server_flags: tuple[str, ...], calibration: str, log_dir) -> tuple[int, int, dict, str]:
    """Every session's first turn, one at a time, then session 0's second turn; returns (session 0's first
    prompt tokens, its second turn's cached tokens, the kvtc metrics, the log)."""
    extra = ["--enable-cache-report", "--enable-metrics", "--disable-overlap-schedule", *TIER_FLAGS, *server_flags]
    srv = start(ServerSpec("kvtc", hf_model(), calibration, max_total_tokens=POOL, extra=extra), log_dir / "s.log")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        files = _excerpts(WL.seed, SESSIONS, 3000, "code")
        convs = [[{"role": "system", "content": f"You are agent #{i}."},
                  {"role": "user", "content": f"Read this file:\n{f}"}] for i, f in enumerate(files)]  # fmt: skip
        first = []
        for i, msgs in enumerate(convs):
            r = chat(client, "default", f"s{i}/t0", list(msgs), WL)
            assert not r.error, r.error
            msgs.append({"role": "assistant", "content": r.text or "(no answer)"})
            first.append(r)
        convs[0].append({"role": "user", "content": "What does the first function do?"})
        again = chat(client, "default", "s0/t1", convs[0], WL)
        assert not again.error, again.error
        metrics = kvtc_metrics(srv)
    finally:
        srv.stop()
    return first[0].prompt_tokens, again.cached_tokens, metrics, srv.log_text()


def test_a_session_pushed_out_of_pool_and_store_comes_back_from_host_memory(artifact_path, tmp_path):
    prompt, cached_without, m_without, log = _sessions((), str(artifact_path), tmp_path / "none")
    assert not scheduler_errors(log)
    assert m_without.get("host_hits_total", 0) == 0 and m_without.get("dropped_tokens_total", 0) > 0
    prompt, cached_with, m_with, log = _sessions(("--kvtc-host-bytes", "256M"), str(artifact_path), tmp_path / "host")
    assert not scheduler_errors(log)
    seen = {k: v for k, v in m_with.items() if v}
    assert m_with["host_demotions_total"] > 0 and m_with["host_hits_total"] >= 1, seen
    assert m_with["host_hit_tokens_total"] >= prompt // 2, seen
    assert cached_with >= prompt - 200 > cached_without, seen  # restored, not recomputed (sinks/window aside)
    assert "#host-hit-token" in log
