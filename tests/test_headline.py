"""The main job's headline (shares pooled and per run, with their spread) and the turn-major replay order."""

from __future__ import annotations

import threading

import pytest

from kvtc_sglang.serve import session_replay
from kvtc_sglang.serve.bench_report import Spread, spread, summarize, ttft_ratio
from kvtc_sglang.serve.headline import headline, speed_check
from kvtc_sglang.serve.session_bench import Outcome, pooled
from kvtc_sglang.serve.session_replay import ReplayConfig, TurnResult, replay


def _server(per_run: list[tuple[float, int]], kvtc: dict[str, float] | None = None) -> dict:
    """One server's pooled summary of runs given as (TTFT of each of its 2 requests, cached tokens of each)."""
    outcomes = [Outcome([TurnResult(s, 0, prompt_tokens=1000, cached_tokens=c, ttft=t) for s in range(2)], 1.0)
                for t, c in per_run]
    out = pooled(outcomes, [summarize(o.results, o.wall, None) for o in outcomes], None)
    if kvtc is not None:
        out["kvtc"] = kvtc
    return out


def test_spread_reference():
    """Hand-worked: prefilled per run vanilla 2000/2000/2000, kvtc 1000/800/1100, big 0 (all cached)."""
    per = {"vanilla": _server([(10.0, 0), (12.0, 0), (11.0, 0)]),
           "kvtc": _server([(6.0, 500), (9.0, 600), (6.0, 450)], {"restored_tokens_total": 3000.0,
                                                                "restores_total": 6.0}),
           "big": _server([(2.0, 1000), (4.0, 1000), (3.0, 1000)])}
    p = spread(per, "prefilled_tokens")
    assert p.runs == pytest.approx((0.5, 0.6, 0.45)) and p.pooled == pytest.approx(3100 / 6000)
    assert p.points == pytest.approx(15.0)
    t = spread(per, "ttft_mean")
    assert t.runs == pytest.approx((0.5, 3 / 8, 5 / 8)) and t.pooled == pytest.approx((11 - 7) / (11 - 3))
    assert t.points == pytest.approx(25.0)
    text = headline(per, "agent sessions")
    assert "3 runs per server" in text
    assert "vanilla 2,000, kvtc 967, big pool 0: kvtc captures 52% (runs 50%, 60%, 45%; spread 15 points)" in text
    assert "kvtc restored 1,000 tokens per run from its blobs (2 restores)" in text
    assert "kvtc 7.000 s, 0.64x (runs 0.60x, 0.75x, 0.55x; spread 20 points) vanilla's" in text
    assert "big pool 3.000 s, 0.27x (runs 0.20x, 0.33x, 0.27x; spread 13 points) vanilla's" in text
    assert "kvtc captures 50% (runs 50%, 38%, 62%; spread 25 points) of the big pool's TTFT gain" in text
    # turn 0 is every request here: vanilla 11 s, big 3 s -> 3.67x apart
    assert "vanilla 11.00 s, kvtc 7.00 s, big 3.00 s: 3.67x apart, the servers ran at different machine speeds" in text


def test_speed_check_reference():
    """Hand-worked: the first turns 1.60 / 1.70 / 1.65 s are 1.06x apart; 2.20 / 1.70 / 1.65 are 1.33x apart."""
    same = {"vanilla": {"ttft_per_turn": [1.6, 2.0]}, "kvtc": {"ttft_per_turn": [1.7, 1.0]},
            "big": {"ttft_per_turn": [1.65, 0.9]}}
    assert "1.06x apart, the servers ran at the same machine speed" in speed_check(same)
    slow = {**same, "vanilla": {"ttft_per_turn": [2.2, 2.5]}}
    assert "1.33x apart, the servers ran at different machine speeds" in speed_check(slow)


def test_spread_without_a_gain_or_servers():
    flat = {n: _server([(5.0, 0), (5.0, 0)]) for n in ("vanilla", "kvtc", "big")}
    s = spread(flat, "ttft_mean")
    assert s.pooled is None and s.points is None and "n/a" in s.text()
    assert Spread(0.5, (0.5,)).points is None  # one run: no spread
    assert ttft_ratio(flat, "kvtc").runs == (1.0, 1.0)
    with pytest.raises(ValueError, match=r"missing \['big'\]"):
        spread({n: flat[n] for n in ("vanilla", "kvtc")}, "ttft_mean")


def _trace(sessions: int, turns: int) -> dict:
    return {"conversations": [[{"messages": [{"role": "user", "content": f"s{s}t{t}"}]} for t in range(turns)]
                              for s in range(sessions)]}


def _recording(monkeypatch) -> list[tuple[str, list[str]]]:
    """Replace the HTTP request by a recording stand-in: (this turn's user text, the history it was sent with)."""
    sent: list[tuple[str, list[str]]] = []
    lock = threading.Lock()
    in_flight = [0]

    def fake(client, model, messages, cfg, result):
        with lock:
            in_flight[0] += 1
            if cfg.order == "turn" and cfg.concurrency == 1 and in_flight[0] > 1:
                raise AssertionError("two requests in flight with concurrency 1")
            sent.append((messages[-1]["content"], [m["content"] for m in messages]))
        result.text = "a:" + messages[-1]["content"]
        with lock:
            in_flight[0] -= 1

    monkeypatch.setattr(session_replay, "stream_chat", fake)
    monkeypatch.setattr("openai.OpenAI", lambda **kw: None)
    return sent


def test_turn_major_order_and_histories(monkeypatch):
    sent = _recording(monkeypatch)
    out = replay("http://x", _trace(3, 2), ReplayConfig(concurrency=1, order="turn"))
    assert [u for u, _ in sent] == ["s0t0", "s1t0", "s2t0", "s0t1", "s1t1", "s2t1"]
    assert sent[3][1] == ["s0t0", "a:s0t0", "s0t1"]  # a session's own answer is in its next turn's history
    assert [(r.session, r.turn) for r in out] == [(s, t) for s in range(3) for t in range(2)]  # trace order


def test_session_order_is_unchanged(monkeypatch):
    sent = _recording(monkeypatch)
    replay("http://x", _trace(3, 2), ReplayConfig(concurrency=1))
    assert [u for u, _ in sent] == ["s0t0", "s0t1", "s1t0", "s1t1", "s2t0", "s2t1"]
    with pytest.raises(ValueError, match="order must be one of"):
        ReplayConfig(order="random")


def test_warmup_runs_and_replay_order_are_checked():
    from kvtc_sglang.serve.session_bench import SessionBenchConfig

    assert SessionBenchConfig(warmup_runs=1).warmup_runs == 1
    with pytest.raises(ValueError, match="warmup_runs must be >= 0, got -1"):
        SessionBenchConfig(warmup_runs=-1)
    with pytest.raises(ValueError, match="replay_order must be one of"):
        SessionBenchConfig(replay_order="random")
