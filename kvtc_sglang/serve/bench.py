"""Vanilla vs kvtc on the stock SGLang server: same pool (``--max-total-tokens``), same seeded workloads.

Starts one server at a time (vanilla, then kvtc), replays :mod:`.workload` through the ``openai`` client
over HTTP on 127.0.0.1, reads the backend's counters from SGLang's ``/metrics`` (``sglang:kvtc_*``), and
prints one table per workload. Servers are always stopped (context manager), also on Ctrl-C or error.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from .launcher import ServerSpec
from .server import SGLangServer
from .workload import RequestResult, WorkloadConfig, WorkloadRun, request_count, run_agentic, run_shared_prompt


def parse_metrics(text: str, prefix: str = "sglang:kvtc_") -> dict[str, float]:
    """``{name without prefix: value}`` of the unlabelled Prometheus samples whose name starts with ``prefix``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            out[name.split("{", 1)[0].removeprefix(prefix)] = float(value)
    return out


@dataclass(frozen=True)
class BenchConfig:
    max_total_tokens: int = 2048
    page_size: int = 1
    store_fraction: float = 0.25
    idle_seconds: float | None = None  # None: kvtc's default (0: the background encoder takes any cold node)
    start_timeout: float = 400.0
    out: Path = Path("out/serve")


def server_spec(backend: str, model: str, calibration: str, cfg: BenchConfig, extra: list[str] | None = None
                ) -> ServerSpec:
    flags = ["--enable-cache-report", "--enable-metrics", "--page-size", str(cfg.page_size),
             "--disable-overlap-schedule"]
    if backend == "kvtc":
        flags += ["--kvtc-store-fraction", str(cfg.store_fraction)]
        if cfg.idle_seconds is not None:
            flags += ["--kvtc-idle-seconds", str(cfg.idle_seconds)]
    return ServerSpec(backend, model, calibration, max_total_tokens=cfg.max_total_tokens,
                      extra=flags + list(extra or []))


def run_backend(backend: str, model: str, calibration: str, cfg: BenchConfig, wl: WorkloadConfig
                ) -> tuple[list[WorkloadRun], dict[str, float]]:
    """Start the server, run both workloads, read ``/metrics``; the server is stopped on return."""
    import openai

    spec = server_spec(backend, model, calibration, cfg)
    with SGLangServer(spec, cfg.out / f"{backend}.log", start_timeout=cfg.start_timeout) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        bar = tqdm(total=request_count(wl), desc=f"{backend:7s} requests", unit="req")
        try:
            runs = [run_agentic(client, "default", wl, bar.update), run_shared_prompt(client, "default", wl,
                                                                                       bar.update)]
        finally:
            bar.close()
        counters = parse_metrics(srv.get("/metrics")[1])
    return runs, counters


def _p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) >= 2 else (xs[0] if xs else 0.0)


def _agreement(results: list[RequestResult], reference: list[RequestResult] | None) -> str:
    if reference is None:
        return "(reference)"
    ref = {r.key: r.text for r in reference}
    same = sum(1 for r in results if ref.get(r.key) == r.text)
    words = []
    for r in results:
        a, b = r.text.split(), ref.get(r.key, "").split()
        n = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        words.append(n)
    return f"{same}/{len(results)} identical, {statistics.mean(words):.1f} words agree"


def summarize(run: WorkloadRun, counters: dict[str, float], reference: WorkloadRun | None) -> dict[str, object]:
    ok = [r for r in run.results if not r.error]
    prompt = sum(r.prompt_tokens for r in ok)
    cached = sum(r.cached_tokens for r in ok)
    ttft = [r.ttft for r in ok]
    lat = [r.latency for r in ok]
    return {
        "requests": len(run.results),
        "errors": len(run.results) - len(ok),
        "empty_answers": sum(1 for r in ok if not r.text.strip()),
        "cached_per_request": cached / max(len(ok), 1),
        "hit_rate": cached / max(prompt, 1),
        "recomputed_tokens": prompt - cached,
        "ttft_mean": statistics.mean(ttft) if ttft else 0.0,
        "ttft_p90": _p90(ttft),
        "latency_mean": statistics.mean(lat) if lat else 0.0,
        "latency_p90": _p90(lat),
        "seconds": run.seconds,
        "agreement": _agreement(run.results, reference.results if reference else None),
    }


ROWS = (
    ("requests (errors, empty answers)", lambda s, c: f"{s['requests']} ({s['errors']}, {s['empty_answers']})"),
    ("cached prompt tokens / request", lambda s, c: f"{s['cached_per_request']:.0f}"),
    ("cache hit rate", lambda s, c: f"{100 * s['hit_rate']:.1f}%"),
    ("tokens recomputed (prefilled)", lambda s, c: f"{s['recomputed_tokens']}"),
    ("TTFT mean / p90 (s)", lambda s, c: f"{s['ttft_mean']:.2f} / {s['ttft_p90']:.2f}"),
    ("latency mean / p90 (s)", lambda s, c: f"{s['latency_mean']:.2f} / {s['latency_p90']:.2f}"),
    ("workload wall time (s)", lambda s, c: f"{s['seconds']:.1f}"),
    ("kvtc compressions / restores", lambda s, c: "-" if c is None else
     f"{c.get('compressions_total', 0):.0f} / {c.get('restores_total', 0):.0f}"),
    ("kvtc tokens compressed / restored", lambda s, c: "-" if c is None else
     f"{c.get('compressed_tokens_total', 0):.0f} / {c.get('restored_tokens_total', 0):.0f}"),
    ("kvtc ratio (resident) / store use", lambda s, c: "-" if c is None else
     f"{c.get('compression_ratio', 0):.1f}x / {100 * c.get('store_usage', 0):.0f}%"),
    ("kvtc restore / compress time (s)", lambda s, c: "-" if c is None else
     f"{c.get('restore_seconds_total', 0):.2f} / {c.get('compress_seconds_total', 0):.2f}"),
    ("kvtc checksum failures / dropped tokens", lambda s, c: "-" if c is None else
     f"{c.get('checksum_failures_total', 0):.0f} / {c.get('dropped_tokens_total', 0):.0f}"),
    ("generation agreement with vanilla", lambda s, c: str(s["agreement"])),
)


def format_tables(summaries: dict[str, dict[str, dict]], counters: dict[str, dict[str, float]]) -> str:
    """Markdown tables, one per workload, columns vanilla | kvtc, plus the kvtc/vanilla ratios."""
    lines = []
    backends = list(counters)
    for workload, per_backend in summaries.items():
        lines += [f"\n### {workload}\n", "| | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
        for label, fn in ROWS:
            cells = [fn(per_backend[b], counters[b] if b == "kvtc" else None) for b in backends]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        if {"vanilla", "kvtc"} <= set(per_backend):
            v, k = per_backend["vanilla"], per_backend["kvtc"]
            lines.append(f"\nkvtc / vanilla: mean TTFT {k['ttft_mean'] / max(v['ttft_mean'], 1e-9):.2f}x, "
                         f"cached-token rate {100 * k['hit_rate']:.1f}% vs {100 * v['hit_rate']:.1f}%, "
                         f"tokens recomputed {k['recomputed_tokens'] / max(v['recomputed_tokens'], 1):.2f}x")
    return "\n".join(lines)


def compare(model: str, calibration: str, cfg: BenchConfig, wl: WorkloadConfig) -> str:
    """Run vanilla then kvtc; returns the tables (also written to ``cfg.out/report.{md,json}``)."""
    runs: dict[str, list[WorkloadRun]] = {}
    counters: dict[str, dict[str, float]] = {}
    for backend in ("vanilla", "kvtc"):
        runs[backend], counters[backend] = run_backend(backend, model, calibration, cfg, wl)
    summaries: dict[str, dict[str, dict]] = {}
    for i, name in enumerate(r.name for r in runs["vanilla"]):
        summaries[name] = {b: summarize(runs[b][i], counters[b], None if b == "vanilla" else runs["vanilla"][i])
                           for b in runs}
    text = format_tables(summaries, counters)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "report.md").write_text(text + "\n")
    raw = {"bench": {k: str(v) for k, v in asdict(cfg).items()}, "workload": asdict(wl), "summaries": summaries,
           "counters": counters,
           "requests": {b: [asdict(r) for run in rs for r in run.results] for b, rs in runs.items()}}
    (cfg.out / "report.json").write_text(json.dumps(raw, indent=1))
    return text
