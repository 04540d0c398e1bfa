"""The main job's headline: what kvtc saves at equal memory, pooled over the runs, each with its run-to-run spread.

It leads with what does not move with batching (tokens prefilled, tokens restored from blobs) and puts TTFT
beside it: kvtc's and the big pool's mean TTFT over vanilla's (a ratio to vanilla's own TTFT, steady from run to
run), then the share of the big pool's TTFT gain kvtc captures (a ratio of two differences, which moves more when
the big pool gains little). Each share is ``(vanilla - kvtc) / (vanilla - big)``
(:func:`.bench_report.share_of_gain`) over the runs' totals; each figure's spread is its largest minus its
smallest per-run value, in points (hundredths).
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

    def text(self, as_ratio: bool = False) -> str:
        """``52% (runs 50%, 60%, 45%; spread 15 points)``, or with ``as_ratio`` ``0.52x (runs 0.50x, ...)``."""
        if self.pooled is None:
            return "n/a (the big pool gains nothing)"

        def cell(x: float | None) -> str:
            return "n/a" if x is None else (f"{x:.2f}x" if as_ratio else f"{100 * x:.0f}%")

        pts = self.points
        return (f"{cell(self.pooled)} (runs {', '.join(cell(x) for x in self.runs)}; spread "
                f"{'n/a' if pts is None else f'{pts:.0f}'} points)")


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


def ttft_ratio(per_server: dict[str, dict[str, Any]], name: str) -> Spread:
    """``name``'s mean TTFT over vanilla's, pooled and per run."""
    v, x = per_server["vanilla"], per_server[name]
    runs = zip(_runs(v), _runs(x), strict=True)
    return Spread(x["ttft_mean"] / v["ttft_mean"] if v["ttft_mean"] else None,
                  tuple(rx["ttft_mean"] / rv["ttft_mean"] if rv["ttft_mean"] else None for rv, rx in runs))


def headline(per_server: dict[str, dict[str, Any]], title: str) -> str:
    """Six lines: tokens prefilled per run and the share of the saving, restores, TTFT over vanilla's, the
    share of the TTFT gain, and the machine-speed check (:func:`speed_check`)."""
    v, k, b = (per_server[n] for n in SERVERS)
    n = len(_runs(k))
    kv = k.get("kvtc") or {}

    def per_run(s: dict[str, Any], key: str) -> float:
        return float(s[key]) / n

    prefill = spread(per_server, "prefilled_tokens")
    ttft = spread(per_server, "ttft_mean")
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
        f"- mean TTFT: vanilla {v['ttft_mean']:.3f} s; kvtc {k['ttft_mean']:.3f} s, "
        f"{ttft_ratio(per_server, 'kvtc').text(as_ratio=True)} vanilla's; big pool {b['ttft_mean']:.3f} s, "
        f"{ttft_ratio(per_server, 'big').text(as_ratio=True)} vanilla's",
        f"- kvtc captures {ttft.text()} of the big pool's TTFT gain",
        speed_check(per_server),
    ))


SPEED_TOLERANCE = 1.10  # first turns' TTFT of the servers within 10% of each other: the same machine speed


def speed_check(per_server: dict[str, dict[str, Any]]) -> str:
    """A line comparing the servers' mean TTFT of turn 0 (a cold prefill of the same tokens on every server: the
    servers run one after another, and one that ran while the machine was slower shows it here)."""
    first = {n: (per_server[n].get("ttft_per_turn") or [0.0])[0] for n in SERVERS}
    lo, hi = min(first.values()), max(first.values())
    apart = hi / lo if lo > 0 else float("inf")
    verdict = ("the servers ran at the same machine speed" if apart <= SPEED_TOLERANCE else
               "the servers ran at different machine speeds: the TTFT ratios above carry that difference")
    cells = ", ".join(f"{n} {t:.2f} s" for n, t in first.items())
    return (f"- check: first turns (the same cold prefill on every server), mean TTFT {cells}: {apart:.2f}x apart, "
            f"{verdict}")
