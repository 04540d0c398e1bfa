"""py-spy stacks of a real kvtc scheduler process (``benchmarks/profile_scheduler.py``) put in categories."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from kvtc_sglang.serve.profile_stacks import OTHER, categorize, parse_raw, profile_counts, profile_table

# 24 stacks recorded by ``py-spy record --threads --format raw`` from a kvtc server's scheduler process during the
# main job's agent sessions (session 12), chosen to cover every category it hit
DATA = Path(__file__).resolve().parent / "data" / "pyspy_raw_kvtc_scheduler.txt"


def counts_ref(lines: list[str]) -> Counter[str]:
    """Reference: samples per (thread name, key function) read with plain string operations."""
    out: Counter[str] = Counter()
    for line in lines:
        head, count = line.rsplit(" ", 1)
        name = head.split(";", 1)[0].split(": ", 1)[1]
        if "kvtc_sglang/codec/" in head:
            key = "codec"
        elif "kvtc_sglang/" in head:
            key = "kvtc"
        elif "run_batch (" in head:
            key = "forward"
        else:
            key = "rest"
        out[f"{name}/{key}"] += int(count)
    return out


def test_real_stacks_are_parsed_and_categorised_as_the_reference_reads_them():
    lines = DATA.read_text().splitlines()
    stacks = parse_raw(lines)
    assert len(stacks) == len(lines) == 24
    assert sum(s.count for s in stacks) == sum(int(x.rsplit(" ", 1)[1]) for x in lines)
    ref = counts_ref(lines)
    got = profile_counts(stacks)
    worker = got["kvtc encode worker"]
    assert worker == Counter({"kvtc codec (encode, restore, CRC)": ref["kvtc-encode_0/codec"]})
    sched = got["scheduler"]
    assert sched["kvtc codec (encode, restore, CRC)"] == ref["MainThread/codec"] > 0  # restores, in admission
    assert sched["kvtc tree, store and bookkeeping"] == ref["MainThread/kvtc"] > 0
    assert sched["forward (run_batch)"] == ref["MainThread/forward"] > 0
    rest = sum(n for c, n in sched.items() if c not in ("kvtc codec (encode, restore, CRC)",
                                                        "kvtc tree, store and bookkeeping", "forward (run_batch)"))
    assert rest == ref["MainThread/rest"] and sched["scheduling (SGLang)"] >= 1 and sched[OTHER] >= 1


def test_a_restore_inside_admission_counts_as_codec_not_as_scheduling():
    restore = next(s for s in parse_raw(DATA.read_text().splitlines())
                   if any("init_load_back" in f for f in s.frames) and any("codec/" in f for f in s.frames))
    assert any("get_next_batch_to_run (" in f for f in restore.frames)
    assert categorize(restore) == "kvtc codec (encode, restore, CRC)"


def test_table_shows_cpu_seconds_per_server():
    stacks = parse_raw(DATA.read_text().splitlines())
    total = sum(s.count for s in stacks)
    table = profile_table({"kvtc": profile_counts(stacks), "vanilla": {}}, rate=100)
    assert table.splitlines()[0] == "| thread | where (CPU s, sampled) | kvtc | vanilla |"
    assert table.splitlines()[-1] == f"| all | **total CPU s sampled** | {total / 100:.1f} | 0.0 |"
    with pytest.raises(ValueError, match="rate must be positive, got 0"):
        profile_table({}, rate=0)


def test_lines_without_frames_and_bad_lines():
    [s] = parse_raw(["thread (4973): MainThread 13"])
    assert s.thread == "MainThread" and s.frames == () and s.count == 13 and categorize(s) == OTHER
    with pytest.raises(ValueError, match="line 2: expected 'thread \\(TID\\): NAME;frames COUNT'"):
        parse_raw(["thread (1): MainThread;f (a.py:1) 3", "not a stack"])
