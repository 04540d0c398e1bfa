"""The main job's headline: what kvtc saves at equal memory, pooled over the runs, each with its run-to-run spread.

It leads with what does not move with batching (tokens prefilled, tokens restored from blobs) and puts TTFT
beside it. Each share is ``(vanilla - kvtc) / (vanilla - big)`` (:func:`.bench_report.share_of_gain`) over
the runs' totals; the spread is the largest minus the smallest per-run share, in points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .bench_report import SERVERS, share_of_gain


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

    def text(self) -> str:
        if self.pooled is None:
            return "n/a (the big pool gains nothing)"
        cells = ", ".join("n/a" if x is None else f"{100 * x:.0f}%" for x in self.runs)
        pts = self.points
        return f"{100 * self.pooled:.0f}% (runs {cells}; spread {'n/a' if pts is None else f'{pts:.0f}'} points)"


def _runs(summary: dict[str, Any]) -> list[dict[str, Any]]:
    return summary.get("runs") or [summary]


def spread(per_server: dict[str, dict[str, Any]], key: str) -> Spread:
    """The share of the big pool's gain in ``key`` (``"prefilled_tokens"``, ``"ttft_mean"``) kvtc captures."""
    missing = [n for n in SERVERS if n not in per_server]
    if missing:
        raise ValueError(f"the headline needs servers {SERVERS}, missing {missing}")
    v, k, b = (per_server[n] for n in SERVERS)
    runs = zip(_runs(v), _runs(k), _runs(b), strict=True)
    return Spread(share_of_gain(v[key], k[key], b[key]).value,
                  tuple(share_of_gain(rv[key], rk[key], rb[key]).value for rv, rk, rb in runs))


def headline(per_server: dict[str, dict[str, Any]], title: str) -> str:
    """Four lines: tokens prefilled per run and the share of the saving, restores, TTFT and its share."""
    v, k, b = (per_server[n] for n in SERVERS)
    n = len(_runs(k))
    kv = k.get("kvtc") or {}

    def per_run(s: dict[str, Any], key: str) -> float:
        return float(s[key]) / n

    prefill = spread(per_server, "prefilled_tokens")
    ttft = spread(per_server, "ttft_mean")
    ratio = k["ttft_mean"] / v["ttft_mean"] if v["ttft_mean"] else float("nan")
    restored = kv.get("restored_tokens_total", 0.0) / n
    restores = kv.get("restores_total", 0.0) / n
    dropped = kv.get("dropped_tokens_total", 0.0)
    errors = sum(per_server[s]["errors"] for s in SERVERS)
    return "\n".join((
        f"## Headline: {title}, {n} run{'s' if n > 1 else ''} per server",
        f"- tokens prefilled per run: vanilla {per_run(v, 'prefilled_tokens'):,.0f}, kvtc "
        f"{per_run(k, 'prefilled_tokens'):,.0f}, big pool {per_run(b, 'prefilled_tokens'):,.0f}: kvtc captures "
        f"{prefill.text()} of the big pool's prefill saving",
        f"- kvtc restored {restored:,.0f} tokens per run from its blobs ({restores:.0f} restores), "
        f"{dropped:,.0f} compressed tokens dropped, {errors} failed requests",
        f"- mean TTFT: vanilla {v['ttft_mean']:.3f} s, kvtc {k['ttft_mean']:.3f} s ({ratio:.2f}x vanilla's), big pool "
        f"{b['ttft_mean']:.3f} s: kvtc captures {ttft.text()} of the big pool's TTFT gain",
    ))
