"""Summaries, the share of the big pool's gain, markdown tables and the TTFT-per-turn plot of a session bench.

Three servers per workload: ``vanilla`` and ``kvtc`` at the same ``--max-total-tokens N``, and ``big``
(vanilla with a pool that holds every session at once: the upper bound of any prefix cache). The share of
the achievable gain kvtc captures is ``(X_vanilla(N) - X_kvtc(N)) / (X_vanilla(N) - X_vanilla(big))`` for
mean TTFT and for tokens prefilled; when the big pool gains (almost) nothing there is nothing to capture and
the report says so instead of dividing by ~0.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .server_metrics import ServerCounters
from .session_replay import TurnResult

SERVERS = ("vanilla", "kvtc", "big")
PLOT_TITLES = {"serving": "agentic, sglang.benchmark.serving", "own": "agentic, own openai client",
               "gsp": "generated-shared-prefix (sglang.benchmark.serving)"}


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default, what ``sglang.benchmark.serving`` reports)."""
    if not xs:
        return 0.0
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within [0, 100], got {q}")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def ttft_per_turn(results: list[TurnResult]) -> list[float]:
    """Mean TTFT over sessions for each turn index (successful requests only)."""
    by_turn: dict[int, list[float]] = {}
    for r in results:
        if r.ok:
            by_turn.setdefault(r.turn, []).append(r.ttft)
    return [statistics.mean(by_turn[t]) for t in sorted(by_turn)]


def summarize(results: list[TurnResult], wall: float, counters: ServerCounters | None,
              throughput: float | None = None) -> dict[str, Any]:
    """The per-server numbers of one workload; ``throughput`` overrides ok/``wall`` (SGLang's own figure)."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft for r in ok]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    c = counters
    return {
        "requests": len(results), "errors": len(results) - len(ok),
        "ttft_mean": statistics.mean(ttft) if ttft else 0.0, "ttft_p90": percentile(ttft, 90),
        "request_throughput": throughput if throughput is not None else len(ok) / max(wall, 1e-9),
        "prompt_tokens": prompt, "cached_tokens": cached, "prefilled_tokens": prompt - cached,
        "server_prefill_tokens": None if c is None else c.prefill_tokens,
        "prefill_forward_s": None if c is None else c.prefill_forward_seconds,
        "run_batch_s": None if c is None else c.run_batch_seconds,
        "codec_s": None if c is None else c.codec_seconds, "codec_label": "" if c is None else c.codec_label,
        "kvtc": {} if c is None else dict(c.kvtc),
        "wall_s": wall, "ttft_per_turn": ttft_per_turn(results),
    }


@dataclass(frozen=True)
class Share:
    """Share of the achievable gain kvtc captures; ``value`` is ``None`` when there is no gain to capture."""

    value: float | None
    note: str


def share_of_gain(vanilla: float, kvtc: float, big: float, min_gain: float = 0.02) -> Share:
    """``(vanilla - kvtc) / (vanilla - big)``; no share when ``vanilla - big <= min_gain * |vanilla|``."""
    if min_gain < 0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")
    gain = vanilla - big
    if gain <= min_gain * abs(vanilla):
        return Share(None, f"no gain to capture: the big pool gives {gain:+.4g} ({big:.4g} vs vanilla "
                           f"{vanilla:.4g}, need > {100 * min_gain:.0f}% of vanilla)")
    value = (vanilla - kvtc) / gain
    return Share(value, f"{100 * value:.0f}% of the big pool's gain ({vanilla - kvtc:+.4g} of {gain:+.4g})")


@dataclass(frozen=True)
class Spread:
    """A share pooled over the runs (``None``: no gain to capture) with its per-run values."""

    pooled: float | None
    runs: tuple[float | None, ...]

    @property
    def points(self) -> float | None:
        """Largest minus smallest per-run share, in points; ``None`` with fewer than two known runs."""
        known = [x for x in self.runs if x is not None]
        return 100 * (max(known) - min(known)) if len(known) >= 2 else None

    def text(self, as_ratio: bool = False) -> str:
        """``52% (runs 50%, 60%, 45%; spread 15 points)``, or with ``as_ratio`` ``0.52x (runs 0.50x, ...)``."""
        if self.pooled is None:
            return "n/a (the big pool gains nothing)"

        def cell(x: float | None) -> str:
            return "n/a" if x is None else (f"{x:.2f}x" if as_ratio else f"{100 * x:.0f}%")

        pts = self.points
        return (f"{cell(self.pooled)} (runs {', '.join(cell(x) for x in self.runs)}; spread "
                f"{'n/a' if pts is None else f'{pts:.0f}'} points)")


def runs_of(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """A pooled summary's per-run summaries; a one-run summary is its own run."""
    return summary.get("runs") or [summary]


def spread(per_server: dict[str, dict[str, Any]], key: str) -> Spread:
    """The share of the big pool's gain in ``key`` (``"prefilled_tokens"``, ``"ttft_mean"``) kvtc captures."""
    missing = [n for n in SERVERS if n not in per_server]
    if missing:
        raise ValueError(f"the share needs servers {SERVERS}, missing {missing}")
    v, k, b = (per_server[n] for n in SERVERS)
    runs = zip(runs_of(v), runs_of(k), runs_of(b), strict=True)
    return Spread(share_of_gain(v[key], k[key], b[key]).value,
                  tuple(share_of_gain(rv[key], rk[key], rb[key]).value for rv, rk, rb in runs))


def ttft_ratio(per_server: dict[str, dict[str, Any]], name: str) -> Spread:
    """``name``'s mean TTFT over vanilla's, pooled and per run."""
    v, x = per_server["vanilla"], per_server[name]
    runs = zip(runs_of(v), runs_of(x), strict=True)
    return Spread(x["ttft_mean"] / v["ttft_mean"] if v["ttft_mean"] else None,
                  tuple(rx["ttft_mean"] / rv["ttft_mean"] if rv["ttft_mean"] else None for rv, rx in runs))


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _kv(s: dict[str, Any], a: str, b: str, fmt: str) -> str:
    kv = s.get("kvtc") or {}
    return "-" if not kv else f"{_f(kv.get(a), fmt)} / {_f(kv.get(b), '.0f')}"


ROWS = (
    ("requests (errors)", lambda s: f"{s['requests']} ({s['errors']})"),
    ("TTFT mean / p90 (s)", lambda s: f"{s['ttft_mean']:.2f} / {s['ttft_p90']:.2f}"),
    ("request throughput (req/s)", lambda s: f"{s['request_throughput']:.3f}"),
    ("prompt / cached tokens (usage)", lambda s: f"{s['prompt_tokens']} / {s['cached_tokens']}"),
    ("tokens prefilled (prompt - cached)", lambda s: f"{s['prefilled_tokens']}"),
    ("tokens prefilled (server counter)", lambda s: _f(s["server_prefill_tokens"], ".0f")),
    ("prefill latency s, summed per request", lambda s: _f(s["prefill_forward_s"], ".1f")),
    ("all forward passes s (run_batch)", lambda s: _f(s["run_batch_s"], ".1f")),
    ("kvtc codec s", lambda s: _f(s["codec_s"], ".2f")),
    ("kvtc compressions / restores", lambda s: _kv(s, "compressions_total", "restores_total", ".0f")),
    ("kvtc tokens compressed / restored", lambda s: _kv(s, "compressed_tokens_total", "restored_tokens_total", ".0f")),
    ("kvtc ratio (resident) / dropped tokens", lambda s: _kv(s, "compression_ratio", "dropped_tokens_total", ".1f")),
    ("workload wall time (s)", lambda s: f"{s['wall_s']:.1f}"),
)


def server_label(name: str, pools: dict[str, int]) -> str:
    return f"{'vanilla' if name == 'big' else name} @ {pools[name]}"


def share_lines(per_server: dict[str, dict[str, Any]]) -> list[str]:
    if not set(SERVERS) <= set(per_server):
        return ["(share of the big pool's gain: needs vanilla, kvtc and big)"]
    v, k, b = (per_server[n] for n in SERVERS)
    t = share_of_gain(v["ttft_mean"], k["ttft_mean"], b["ttft_mean"])
    p = share_of_gain(v["prefilled_tokens"], k["prefilled_tokens"], b["prefilled_tokens"])
    lines = [f"kvtc captures, of the big pool's gain over vanilla at equal memory: mean TTFT: {t.note}; "
             f"tokens prefilled: {p.note}"]
    spread = per_run(per_server)
    if spread is not None:
        ratios, values = spread
        known = [r for r in ratios if r is not None]
        cells = ", ".join("n/a" if x is None else f"{100 * x:.0f}%" for x in values)
        lines.append(f"{len(ratios)} runs per server (token counts above are totals over them); per run: kvtc TTFT / "
                     f"vanilla TTFT {', '.join('n/a' if r is None else f'{r:.2f}x' for r in ratios)} (min "
                     f"{min(known, default=0):.2f}x, max {max(known, default=0):.2f}x); share of the big pool's "
                     f"TTFT gain {cells}")
    return lines


def per_run(per_server: dict[str, dict[str, Any]]) -> tuple[list[float | None], list[float | None]] | None:
    """Run by run (the i-th run of each server): kvtc's mean TTFT over vanilla's, and the share of the big pool's
    TTFT gain kvtc captures; ``None`` unless every server has the same number (> 1) of runs."""
    runs = [per_server[n].get("runs") or [] for n in SERVERS]
    if len(runs[0]) < 2 or len({len(r) for r in runs}) != 1:
        return None
    return list(ttft_ratio(per_server, "kvtc").runs), list(spread(per_server, "ttft_mean").runs)


def format_table(workload: str, per_server: dict[str, dict[str, Any]], pools: dict[str, int]) -> str:
    names = [n for n in SERVERS if n in per_server]
    lines = [f"\n### {workload}\n", "| | " + " | ".join(server_label(n, pools) for n in names) + " |",
             "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(fn(per_server[n]) for n in names) + " |" for label, fn in ROWS]
    labels = {per_server[n]["codec_label"] for n in names if per_server[n]["codec_s"] is not None}
    lines += ["", *share_lines(per_server)]
    if labels:
        lines.append(f"(kvtc codec s: {', '.join(sorted(labels))})")
    return "\n".join(lines)


FOOTNOTE = " ".join((
    "Tokens prefilled: prompt minus cached tokens of each request's usage; the server counter is SGLang's",
    "realtime_tokens_total{mode=prefill_compute}. Prefill latency: SGLang's",
    "per_stage_req_latency_seconds{stage=prefill_forward}, each request's time from its first forward pass to",
    "the end of its prefill, summed over requests (a batch of k requests counts k times, decode steps run",
    "between a request's chunks count too): a latency, not compute time; SGLang 0.5.23 exposes no prefill",
    "compute time on CPU (its forward timer records CUDA events). All forward passes:",
    "scheduler_stage_seconds_total{category=run_batch}, prefill and decode together. Wall time of",
    "sglang.benchmark.serving workloads: its own benchmark duration.",
))


def shares(per_server: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    if not set(SERVERS) <= set(per_server):
        return {}
    v, k, b = (per_server[n] for n in SERVERS)
    out: dict[str, dict[str, Any]] = {}
    for key in ("ttft_mean", "prefilled_tokens"):
        s = share_of_gain(v[key], k[key], b[key])
        out[key] = {"value": s.value, "note": s.note}
    spread = per_run(per_server)
    if spread is not None:
        out["ttft_mean"]["kvtc_over_vanilla"], out["ttft_mean"]["runs"] = spread
    return out


def plot_ttft_per_turn(summaries: dict[str, dict[str, dict[str, Any]]], pools: dict[str, int], path: Path,
                       title: str = "") -> Path:
    """One panel per multi-turn workload: mean TTFT over sessions per turn, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {w: s for w, s in summaries.items() if max(len(x["ttft_per_turn"]) for x in s.values()) > 1}
    if not panels:
        raise ValueError(f"expected a multi-turn workload to plot, got {list(summaries)}")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (workload, per_server) in zip(axes[0], panels.items(), strict=True):
        turns = 0
        for name in (n for n in SERVERS if n in per_server):
            ys = per_server[name]["ttft_per_turn"]
            turns = max(turns, len(ys))
            ax.plot(range(1, len(ys) + 1), ys, marker="o", label=server_label(name, pools))
        ax.set_xticks(range(1, turns + 1))
        ax.set(title=PLOT_TITLES.get(workload, workload), xlabel="turn (1 = first read / first question)",
               ylabel="mean TTFT over sessions (s)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
