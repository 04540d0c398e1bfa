"""The main job's headline: what kvtc saves at equal memory, pooled over the runs, each with its run-to-run spread.

It leads with what does not move with batching (tokens prefilled, tokens restored from blobs) and puts TTFT
beside it: kvtc's and the big pool's mean TTFT over vanilla's (a ratio to vanilla's own TTFT, steady from run to
run), then the share of the big pool's TTFT gain kvtc captures (a ratio of two differences, which moves more when
the big pool gains little). Each share is ``(vanilla - kvtc) / (vanilla - big)``
(:func:`.bench_report.spread`) over the runs' totals; each figure's spread is its largest minus its
smallest per-run value, in points (hundredths).
"""

from __future__ import annotations

from typing import Any

from .bench_report import SERVERS, runs_of, spread, ttft_ratio


def headline(per_server: dict[str, dict[str, Any]], title: str) -> str:
    """Six lines: tokens prefilled per run and the share of the saving, restores, TTFT over vanilla's, the
    share of the TTFT gain, and the machine-speed check (:func:`speed_check`)."""
    v, k, b = (per_server[n] for n in SERVERS)
    n = len(runs_of(k))
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
