"""Joint encoding across requests: the shared-files trace (:mod:`.shared_files`) on every server one at a time.

Servers (all but ``big`` at the same ``--max-total-tokens N``):

* ``vanilla``: SGLang's own radix cache;
* ``kvtc``: the kvtc backend (every session's copy of a file coded alone);
* ``kvtc+joint``: kvtc with ``--kvtc-joint-calibration PATH`` (a repeated span coded as a residual against a
  shared reference);
* ``big``: vanilla at a pool that holds every session at once.

Each run replays the trace turn-major (:func:`.session_replay.replay`, ``order="turn"``) through
:func:`.tier_bench.run_entry` (flush, ``/metrics`` before and after, the difference counts); the runs are
interleaved (run 1 of every server, then run 2...). The table: tokens prefilled, mean TTFT against vanilla's, and
kvtc's resident compressed tokens and blob bytes at the end of each run, restored tokens and every ``joint_*``
metric the server exports.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from .bench_report import runs_of, ttft_ratio
from .sessions import pool_for_everything
from .tier_bench import TierBenchConfig, run_entry, run_interleaved
from .tier_report import Entry, pooled

SERVERS = ("vanilla", "kvtc", "kvtc+joint", "big")
JOINT_FLAG = "--kvtc-joint-calibration"


@dataclass(frozen=True)
class JointEntry(Entry):
    """One column: :class:`.tier_report.Entry` plus the joint reference of ``kvtc+joint``."""

    joint_calibration: str = ""

    def flags(self) -> list[str]:
        return [JOINT_FLAG, self.joint_calibration] if self.kind == "kvtc+joint" else []


def entries(servers: tuple[str, ...], pool: int, big_pool: int, joint_calibration: str | None) -> list[JointEntry]:
    """The columns in run order; ``kvtc+joint`` is left out (with a printed note) without a joint calibration."""
    bad = [s for s in servers if s not in SERVERS]
    if bad or not servers:
        raise ValueError(f"servers must be a non-empty subset of {SERVERS}, got {servers}")
    out = []
    for kind in (k for k in SERVERS if k in servers):
        if kind == "kvtc+joint" and not joint_calibration:
            print("note: kvtc+joint skipped: no --joint-calibration PATH given", flush=True)
            continue
        out.append(JointEntry(kind, big_pool if kind == "big" else pool, joint_calibration=joint_calibration or ""))
    if not out:
        raise ValueError(f"no server left to run of {servers}")
    return out


def default_pool(trace: dict[str, Any], store_fraction: float, sessions_raw: float = 1.5, step: int = 256) -> int:
    """A ``--max-total-tokens`` whose raw slots hold about ``sessions_raw`` of the largest session's context."""
    largest = max(s["estimated_final_context"] for s in trace["metadata"]["sessions"])
    return math.ceil(sessions_raw * largest / (1 - store_fraction) / step) * step


def run_bench(
    model: str, calibration: str, trace: dict[str, Any], cfg: TierBenchConfig, joint_calibration: str | None = None
) -> dict[str, Any]:
    """Every server ``cfg.runs`` times, interleaved; writes ``report.json`` and ``report.md`` into ``cfg.out``."""
    big = cfg.big_pool or max(pool_for_everything(trace, cfg.page_size), 2 * cfg.max_total_tokens)
    cols = entries(cfg.servers, cfg.max_total_tokens, big, joint_calibration)
    got = run_interleaved(cols, lambda e, run: run_entry(e, model, calibration, trace, cfg=cfg, run=run), cfg.runs,
                          cfg.out)
    summaries = {  # "runs" kept with one run too (its machine load)
        k: {
            **pooled(
                [g["summary"] for g in v], [g["results"] for g in v], [g["wall"] for g in v], [g["counters"] for g in v]
            ),
            "runs": [g["summary"] for g in v],
        }
        for k, v in got.items()
    }
    report = {
        "config": {k: str(v) for k, v in asdict(cfg).items() if k not in ("host_bytes",)},
        "joint_calibration": joint_calibration,
        "trace_metadata": trace["metadata"],
        "columns": [{**asdict(e), "key": e.key} for e in cols],
        "summaries": summaries,
        "servers": {e.key: {"startup_s": [g["startup_s"] for g in got[e.key]], "flags": e.flags()} for e in cols},
        "requests": {
            k: [{"run": i, **asdict(r)} for i, g in enumerate(v) for r in g["results"]] for k, v in got.items()
        },
    }
    (cfg.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (cfg.out / "report.md").write_text(format_report(report) + "\n")
    return report


# ----- the table -----


def _kv(run: dict[str, Any], name: str, scale: float = 1.0) -> float | None:
    x = (run.get("kvtc") or {}).get(name)
    return None if x is None else x * scale


def held_bytes(run: dict[str, Any]) -> float | None:
    """Bytes of the compressed nodes' blobs plus every shared reference (joint encoding; charged in full to the
    compressed tokens, though retained nodes' residuals read them too)."""
    used = _kv(run, "resident_bytes")
    return None if used is None else used + (_kv(run, "joint_reference_bytes") or 0.0)


def bytes_per_token(run: dict[str, Any]) -> float | None:
    tokens, used = _kv(run, "resident_tokens"), held_bytes(run)
    return used / tokens if tokens and used is not None else None


def _cell(summary: dict[str, Any], value: Callable[[dict[str, Any]], float | None], fmt: str, total: bool) -> str:
    """The pooled value (sum over runs if ``total``, else their mean), then the per-run values when > 1 run."""
    xs = [value(r) for r in runs_of(summary)]
    known = [x for x in xs if x is not None]
    if not known:
        return "-"
    head = format(sum(known) if total else statistics.mean(known), fmt)
    return head if len(xs) == 1 else f"{head} ({', '.join('-' if x is None else format(x, fmt) for x in xs)})"


def _ratio(summaries: dict[str, dict[str, Any]], key: str) -> str:
    if key == "vanilla":
        return "1.00x (reference)"
    if "vanilla" not in summaries:
        return "n/a (no vanilla)"
    try:
        spread = ttft_ratio(summaries, key)
    except ValueError:  # a different number of runs
        return "n/a"
    return spread.text(as_ratio=True) if len(spread.runs) > 1 else spread.text(as_ratio=True).split(" (")[0]


ROWS: tuple[tuple[str, Callable[[dict[str, Any]], float | None], str, bool], ...] = (
    ("tokens prefilled (prompt - cached)", lambda r: r["prefilled_tokens"], ".0f", True),
    ("tokens prefilled (server counter)", lambda r: r["server_prefill_tokens"], ".0f", True),
    ("TTFT mean (s)", lambda r: r["ttft_mean"], ".2f", False),
    ("kvtc restored tokens", lambda r: _kv(r, "restored_tokens_total"), ".0f", True),
    ("kvtc dropped tokens (store)", lambda r: _kv(r, "dropped_tokens_total"), ".0f", True),
    ("resident compressed tokens (end of run)", lambda r: _kv(r, "resident_tokens"), ".0f", False),
    ("resident blob KiB (end of run)", lambda r: _kv(r, "resident_bytes", 1 / 1024), ".1f", False),
    ("blob + reference KiB (end of run)", lambda r: None if (b := held_bytes(r)) is None else b / 1024, ".1f", False),
    ("bytes per compressed token (references included)", bytes_per_token, ".1f", False),
    ("compression ratio (resident)", lambda r: _kv(r, "compression_ratio"), ".1f", False),
    ("kvtc codec s", lambda r: r["codec_s"], ".2f", True),
    ("workload wall time (s)", lambda r: r["wall_s"], ".1f", True),
)


def _load(summary: dict[str, Any]) -> str:
    loads = [r["loadavg_1m"] for r in runs_of(summary) if r.get("loadavg_1m")]
    return ", ".join(f"{a:.1f} / {b:.1f}" for a, b in loads) or "-"


def joint_keys(summaries: dict[str, dict[str, Any]]) -> list[str]:
    """Every ``joint_*`` kvtc metric any run of any server exported, sorted."""
    return sorted(
        {k for s in summaries.values() for r in runs_of(s) for k in (r.get("kvtc") or {}) if k.startswith("joint_")}
    )


def format_report(report: dict[str, Any]) -> str:
    meta, cfg, cols, summaries = report["trace_metadata"], report["config"], report["columns"], report["summaries"]
    c = meta["config"]
    files = ", ".join(f"{f['path']} ({f['file_tokens']} tokens, sessions {f['sessions']})" for f in meta["files"])
    offsets = ", ".join(str(s["file_offset_tokens"]) for s in meta["sessions"])
    ratio = _kv(summaries["kvtc"], "compression_ratio") if "kvtc" in summaries else None
    store = float(cfg["store_fraction"]) * int(cfg["max_total_tokens"])
    fit = (
        f" kvtc's store ({store:.0f} slots) holds at most ~{store * ratio:.0f} tokens at kvtc's measured "
        f"{ratio:.1f}x; the sessions' KV is {meta['estimated_context_total'] / (store * ratio):.2f}x that."
        if ratio
        else ""
    )
    parts = [
        f"Shared files, turn-major: {c['sessions']} sessions x {c['turns']} turns read {c['files']} files "
        f"({files}) after histories of {c['history_tokens']} tokens; the file's token offset per session: "
        f"{offsets}. {meta['estimated_prompt_tokens_total']} prompt tokens in all, final contexts "
        f"{meta['estimated_context_total']} tokens together, {meta['shared_block_tokens_repeated']} of them "
        f"repeats of a file already read; {cfg['concurrency']} request(s) in flight; pool N = "
        f"{cfg['max_total_tokens']} (kvtc store fraction {cfg['store_fraction']}); runs: {cfg['runs']}.{fit}",
        "",
        "| | "
        + " | ".join(f"{'vanilla (big)' if x['kind'] == 'big' else x['key']} @ {x['pool']}" for x in cols)
        + " |",
        "|---|" + "---|" * len(cols),
    ]

    def row(label: str, cells: list[str]) -> None:
        parts.append(f"| {label} | " + " | ".join(cells) + " |")

    row(
        "requests (errors)",
        [
            _cell(summaries[x["key"]], lambda r: r["requests"], ".0f", True)
            + " ("
            + _cell(summaries[x["key"]], lambda r: r["errors"], ".0f", True)
            + ")"
            for x in cols
        ],
    )
    for label, fn, fmt, total in ROWS:
        row(label, [_cell(summaries[x["key"]], fn, fmt, total) for x in cols])
        if label == "TTFT mean (s)":
            row("**TTFT / vanilla's**", [_ratio(summaries, x["key"]) for x in cols])
    row("TTFT per turn (s)", [", ".join(f"{t:.2f}" for t in summaries[x["key"]]["ttft_per_turn"]) for x in cols])
    row("machine load (1-min) before / after", [_load(summaries[x["key"]]) for x in cols])
    for k in joint_keys(summaries):
        row(k, [_cell(summaries[x["key"]], lambda r, k=k: _kv(r, k), ".6g", k.endswith("_total")) for x in cols])
    startups = ", ".join(
        f"{k} {' / '.join(f'{t:.0f}' for t in v['startup_s'])} s" for k, v in report.get("servers", {}).items()
    )
    parts += [
        "",
        f"Server start-up: {startups}." if startups else "",
        "Cells: the value over all runs (tokens and seconds summed, TTFT and end-of-run gauges averaged), then "
        "each run's. TTFT per turn: turn 1 is every session's cold read (the same prefill on every server: a "
        "machine-speed check), later turns the returns. Tokens prefilled: prompt - cached of each request's "
        "usage; kvtc figures: SGLang's /metrics (sglang:kvtc_*), counters as the difference over the run, "
        "resident figures the gauges at its end; joint_* rows: whatever joint-encoding metrics the server "
        "exports (zero on a server without the option).",
    ]
    return "\n".join(parts)
