"""The tensor-parallel ranks' agreement (``cache/ranks.py``) over a real two-process gloo group: MIN of the
finished jobs, element-wise MAX of blob sizes and failures, and a clear error when the ranks' decision digests
differ (what would otherwise be a hang or two trees drifting apart). Plus the paths, flags and environment of
serving at ``--tp-size N``."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvtc_sglang.cache.config import refused_server_option, refused_tp
from kvtc_sglang.cache.ranks import DecisionDigest, LocalAgreement, RankAgreement
from kvtc_sglang.calibration.fit import artifact_name
from kvtc_sglang.codec.tp import rank_artifact_path
from kvtc_sglang.serve.launcher import NO_NCCL, ServerSpec, cpu_thread_binding, server_env, tp_size_of


def _rank_main(rank: int, init: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        agree = RankAgreement(dist.new_group([0, 1], backend="gloo"), rank, 2)
        digest = DecisionDigest()
        digest.mix("encode", 100, 4)
        digest.mix("compress", 96, 4)
        results = [agree.tick(finished=3 - 2 * rank, digest=digest)]  # rank 0: 3 jobs done, rank 1: 1
        results.append(agree.max_each([10 + rank, 500 - rank, rank]))  # sizes, then a failure flag
        results.append(agree.max_each([]))
        if rank == 1:
            digest.mix("drop", 12, 3)  # a decision rank 0 did not take
        try:
            agree.tick(finished=0, digest=digest)
            results.append("no error")
        except RuntimeError as e:
            results.append(str(e))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_agree_on_min_and_max_and_name_a_divergence():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(f"file://{tmp}/rendezvous", tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in (0, 1))
    for rank, res in enumerate((r0, r1)):
        assert res[0] == 1  # MIN over the ranks: only the first job is committed
        assert res[1] == [11, 500, 1]  # MAX per element: the larger blob, any rank's failure
        assert res[2] == []
        assert "ranks' radix trees diverged" in res[3], res[3]  # both ranks see it, neither hangs
        assert f"rank {rank} has decision digest" in res[3] and f"after {2 + rank} decisions" in res[3]


def test_one_rank_agrees_with_itself_and_the_digest_is_stable():
    local = LocalAgreement()
    d = DecisionDigest()
    assert local.tick(5, d) == 5 and local.max_each([3, 1]) == [3, 1]
    d.mix("compress", 96, 4)
    first = d.value
    d.clear()
    d.mix("compress", 96, 4)
    assert d.value == first != 0 and d.count == 1  # no per-process hash() salt: equal on every rank
    d.mix("drop", 96, 4)
    assert d.value != first and 0 <= d.value < 1 << 62


def test_rank_artifact_paths_are_the_ones_calibration_writes():
    whole = f"/a/{artifact_name('smollm2-135m-instruct', 16)}"
    for rank in (0, 1):
        assert rank_artifact_path(whole, 2, rank).name == artifact_name("smollm2-135m-instruct", 16, rank, 2)
    assert str(rank_artifact_path(whole, 1, 0)) == whole
    with pytest.raises(ValueError, match="not a rank's"):
        rank_artifact_path(rank_artifact_path(whole, 2, 1), 2, 1)
    with pytest.raises(ValueError, match="ends with .kvtc.safetensors"):
        rank_artifact_path("/a/model.bin", 2, 0)


def test_tensor_parallel_refusals_name_the_option():
    cpu = {"tp_size": 2, "device": "cpu"}
    assert refused_server_option(cpu.get) is None
    assert "CPU engine only" in refused_server_option({"tp_size": 2, "device": "cuda"}.get)
    assert "pipeline parallelism" in refused_server_option({**cpu, "pp_size": 2}.get)
    assert "P/D disaggregation" in refused_server_option({**cpu, "disaggregation_mode": "decode"}.get)
    assert refused_server_option({**cpu, "disaggregation_mode": "null"}.get) is None
    assert "data parallelism" in refused_server_option({**cpu, "enable_dp_attention": True}.get)
    assert "--kvtc-idle-seconds 2" in refused_tp(2.0, 2)
    assert refused_tp(0.0, 2) is None and refused_tp(2.0, 1) is None


def test_cpu_tensor_parallel_environment():
    assert tp_size_of(["--tp-size", "2"]) == tp_size_of(["--tp=2"]) == 2 and tp_size_of([]) == 1
    with pytest.raises(ValueError, match="--tp-size must be an integer"):
        tp_size_of(["--tp", "two"])
    assert cpu_thread_binding(2, [0, 1]) == "0|1"
    assert cpu_thread_binding(2, [0, 1, 2, 3, 4]) == "0,1|2,3"
    with pytest.raises(ValueError, match="needs 4 cores or more"):
        cpu_thread_binding(4, [0, 1])
    env = server_env(ServerSpec("kvtc", "m", "c", cpu=True, extra=["--tp-size", "2"]), base={})
    assert env["SGLANG_NCCL_SO_PATH"] == NO_NCCL and not os.path.exists(NO_NCCL)
    assert env["SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK"] == "0" and "|" in env["SGLANG_CPU_OMP_THREADS_BIND"]
    kept = server_env(ServerSpec("kvtc", "m", "c", cpu=True, extra=["--tp-size", "2"]),
                      base={"SGLANG_CPU_OMP_THREADS_BIND": "1|0"})
    assert kept["SGLANG_CPU_OMP_THREADS_BIND"] == "1|0"  # the caller's binding wins
    assert "SGLANG_NCCL_SO_PATH" not in server_env(ServerSpec("kvtc", "m", "c", cpu=True), base={})


def test_serving_the_default_model_at_tp2_writes_the_missing_rank_artifacts_once(tmp_path, monkeypatch):
    from kvtc_sglang.serve import launcher

    calls: list[list[str]] = []
    monkeypatch.setattr("kvtc_sglang.serve.export.export_default_model", lambda path: path)
    monkeypatch.setattr(launcher.subprocess, "run", lambda cmd, check: calls.append(cmd))

    def arg(cmd, flag, n=1):
        i = cmd.index(flag)
        return cmd[i + 1 : i + 1 + n]

    _, cal = launcher.prepare_default_model(tmp_path, tokens=16_384, tp_size=2)  # nothing yet: tp 1 and 2
    assert arg(calls[-1], "--tp-sizes", 2) == ["1", "2"] and arg(calls[-1], "--tokens") == ["16384"]
    cal.parent.mkdir(parents=True)
    cal.write_bytes(b"")
    launcher.prepare_default_model(tmp_path, tokens=16_384, tp_size=2)  # the whole model's exists: ranks only
    assert arg(calls[-1], "--tp-sizes") == ["2"] and arg(calls[-1], "--out") == [str(cal.parent)]
    for rank in (0, 1):
        rank_artifact_path(cal, 2, rank).write_bytes(b"")
    launcher.prepare_default_model(tmp_path, tokens=16_384, tp_size=2)
    assert len(calls) == 2  # everything is there: no calibration
    full = launcher.calibration_path(tmp_path)
    full.write_bytes(b"")  # the full calibration is used whenever it exists; its ranks come from as much text
    launcher.prepare_default_model(tmp_path, tokens=16_384, tp_size=2)
    assert arg(calls[-1], "--tp-sizes") == ["2"] and arg(calls[-1], "--tokens") == ["100000"]
    assert arg(calls[-1], "--out") == [str(tmp_path)]


def test_agree_encodes_reserves_each_new_reference_at_the_larger_ranks_size():
    """Joint encoding under tensor parallelism: a job's new reference blobs are sized per rank like its blobs, so
    they go into the same MAX (one collective) and each rank stores them in the larger size."""
    from types import SimpleNamespace

    from kvtc_sglang.cache.joint_encode import JointPlan
    from kvtc_sglang.cache.ranks import agree_encodes

    def job(sizes, plans, made):
        return SimpleNamespace(targets=[None] * len(sizes), results=[(torch.empty(n, dtype=torch.uint8), None)
                               for n in sizes], plans=plans, made={i: (torch.empty(n, dtype=torch.uint8), None)
                               for i, n in made.items()})  # fmt: skip

    a = job([30, 40, 50], [None, JointPlan(None, 0, 64), JointPlan(7, 0, 64)], {1: 900})
    b = job([10], [], {})
    other = {0: 35, 1: 38, 2: 50, 3: 1000, 4: 12}  # the other rank's values at each position of the MAX

    class Max(LocalAgreement):
        def max_each(self, values):
            return [max(v, other.get(i, 0)) for i, v in enumerate(values)]

    out = agree_encodes(Max(), [a, b])
    assert out == [([35, 40, 50], {1: 1000}), ([12], {})]
    assert a.results and b.results  # no rank failed
    local = agree_encodes(LocalAgreement(), [a])
    assert local == [([30, 40, 50], {1: 900})]
