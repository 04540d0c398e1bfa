"""The fleet benchmark's summaries, aims and tables (:mod:`fleet_bench` runs; this only reads results): tokens
prefilled from usage and the replicas' counters, TTFT, kvtc's L3/host counters, per-session restore verdicts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .bench_report import percentile
from .server_metrics import ServerCounters
from .session_replay import TurnResult

AIM_FLEET_RATIO = 0.4  # kvtc + Mooncake under round robin prefills at most this share of vanilla's tokens
L3_KEYS = ("l3_put_objects_total", "l3_put_bytes_total", "l3_hits_total", "l3_hit_tokens_total", "l3_parked_total",
           "l3_rejected_total", "l3_get_seconds_total", "l3_get_objects_total", "l3_get_errors_total",
           "l3_prefetch_timeouts_total", "host_hit_tokens_total", "restored_tokens_total")


def summarize(results: list[TurnResult], before: list[ServerCounters], after: list[ServerCounters],
              wall: float) -> dict[str, Any]:
    """Tokens prefilled (usage and the replicas' counters), TTFT, kvtc's L3/host counters summed over replicas."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    deltas = [a.minus(b) for a, b in zip(after, before, strict=True)]
    prefill = [d.prefill_tokens for d in deltas]
    return {
        "requests": len(results), "errors": len(results) - len(ok),
        "prompt_tokens": sum(r.prompt_tokens for r in ok), "cached_tokens": sum(r.cached_tokens for r in ok),
        "prefilled_tokens": sum(r.prompt_tokens - r.cached_tokens for r in ok),
        "server_prefill_tokens": None if None in prefill else sum(p or 0.0 for p in prefill),
        "server_prefill_per_replica": prefill,
        "ttft_mean": sum(ttft) / len(ttft) if ttft else 0.0, "ttft_p90": percentile(ttft, 90),
        "ttft_per_turn": _per_turn(ok), "wall_s": wall,
        "kvtc": {k: sum(d.kvtc.get(k, 0.0) for d in deltas) for k in L3_KEYS} if any(d.kvtc for d in deltas) else {},
    }


def _per_turn(results: list[TurnResult]) -> list[float]:
    turns: dict[int, list[float]] = {}
    for r in results:
        turns.setdefault(r.turn, []).append(r.ttft)
    return [sum(v) / len(v) for _, v in sorted(turns.items())]


def resumed(results: list[TurnResult], chunk_tokens: int = 256) -> list[dict[str, Any]]:
    """Per resumed session: restored (at least one whole chunk cached on a fresh server: the few template tokens
    every session shares are cached from another session's turn), prompt, cached, prefilled, TTFT."""
    return [{"session": r.session, "restored": r.ok and r.cached_tokens >= chunk_tokens,
             "prompt_tokens": r.prompt_tokens, "cached_tokens": r.cached_tokens,
             "prefilled_tokens": r.prompt_tokens - r.cached_tokens, "ttft": r.ttft, "error": r.error} for r in results]


def fleet_aim(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """kvtc + Mooncake under round robin prefills <= AIM_FLEET_RATIO x vanilla's tokens (usage)."""
    v, k = summaries.get("vanilla/round_robin"), summaries.get("kvtc/round_robin")
    if not v or not k or not v["prefilled_tokens"]:
        return {"met": None, "ratio": None, "text": "not measured"}
    ratio = k["prefilled_tokens"] / v["prefilled_tokens"]
    met = ratio <= AIM_FLEET_RATIO and not k["errors"]
    return {"met": met, "ratio": ratio, "text": f"{'met' if met else 'not met'} ({ratio:.2f}x)"}


def restart_aim(sessions: list[dict[str, Any]]) -> dict[str, Any]:
    n = sum(1 for s in sessions if s["restored"])
    return {"met": bool(sessions) and n == len(sessions), "restored": n, "sessions": len(sessions),
            "text": f"{'met' if sessions and n == len(sessions) else 'not met'} ({n}/{len(sessions)} restored)"}


def _n(x: float | None, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def fleet_table(summaries: dict[str, dict[str, Any]]) -> str:
    cols = list(summaries)
    rows = [
        ("requests (errors)", lambda s: f"{s['requests']} ({s['errors']})"),
        ("prompt / cached tokens (usage)", lambda s: f"{s['prompt_tokens']} / {s['cached_tokens']}"),
        ("**tokens prefilled** (prompt - cached)", lambda s: f"**{s['prefilled_tokens']}**"),
        ("tokens prefilled (replicas' counters, A + B)", lambda s: f"{_n(s['server_prefill_tokens'])} ("
         + " + ".join(_n(p) for p in s["server_prefill_per_replica"]) + ")"),
        ("TTFT mean / p90 (s)", lambda s: f"{s['ttft_mean']:.2f} / {s['ttft_p90']:.2f}"),
        ("TTFT per turn (s)", lambda s: ", ".join(f"{x:.2f}" for x in s["ttft_per_turn"])),
        ("L3 puts (MiB) / hits / hit tokens", lambda s: "-" if not s["kvtc"] else
         f"{_n(s['kvtc']['l3_put_objects_total'])} ({_n(s['kvtc'].get('l3_put_bytes_total', 0) / 2**20, '.1f')}) / "
         f"{_n(s['kvtc']['l3_hits_total'])} / {_n(s['kvtc']['l3_hit_tokens_total'])}"),
        ("L3 parked / rejected / get s", lambda s: "-" if not s["kvtc"] else
         f"{_n(s['kvtc']['l3_parked_total'])} / {_n(s['kvtc']['l3_rejected_total'])} / "
         f"{_n(s['kvtc']['l3_get_seconds_total'], '.2f')}"),
        ("L3 objects fetched / get errors / prefetch timeouts", lambda s: "-" if not s["kvtc"] else
         f"{_n(s['kvtc']['l3_get_objects_total'])} / {_n(s['kvtc']['l3_get_errors_total'])} / "
         f"{_n(s['kvtc']['l3_prefetch_timeouts_total'])}"),
        ("kvtc restored / host-hit tokens", lambda s: "-" if not s["kvtc"] else
         f"{_n(s['kvtc']['restored_tokens_total'])} / {_n(s['kvtc']['host_hit_tokens_total'])}"),
        ("workload wall (s)", lambda s: f"{s['wall_s']:.0f}"),
    ]
    lines = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    lines += [f"| {label} | " + " | ".join(fn(summaries[c]) for c in cols) + " |" for label, fn in rows]
    return "\n".join(lines)


def restart_table(runs: dict[str, dict[str, Any]]) -> str:
    """One row per resumed session: ``restored? cached/prompt, TTFT`` per server; totals last."""
    cols = list(runs)
    lines = ["| session | " + " | ".join(f"{c}: cached / prompt, TTFT" for c in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for i in range(max((len(r["resumed"]) for r in runs.values()), default=0)):
        cells = []
        for c in cols:
            s = runs[c]["resumed"][i] if i < len(runs[c]["resumed"]) else None
            cells.append("-" if s is None else f"{'restored' if s['restored'] else 'prefilled'} {s['cached_tokens']}"
                         f" / {s['prompt_tokens']}, {s['ttft']:.2f} s")
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    tot = [f"{sum(s['prefilled_tokens'] for s in runs[c]['resumed'])} prefilled, TTFT mean "
           f"{runs[c]['next']['ttft_mean']:.2f} s" for c in cols]
    lines.append("| all | " + " | ".join(tot) + " |")
    return "\n".join(lines)


def save(out: Path, name: str, report: dict[str, Any], text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    (out / f"{name}.md").write_text(text + "\n")
