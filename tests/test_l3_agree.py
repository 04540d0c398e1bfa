"""What tensor-parallel ranks agree on before an L3 prefetch changes their trees (``cache/l3_agree.py``), over a
real two-process gloo group: a request is released only once every rank has its result, with the chunks every
rank has and cut alike, and blobs are charged the larger rank's size. One rank agrees with itself."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvtc_sglang.cache.l3_agree import NOT_DONE, agree_charges, agree_prefetches, layout_hash
from kvtc_sglang.cache.ranks import LocalAgreement, RankAgreement

A = [(0, 0, 4), (1, 4, 64)]  # a chunk cut as raw sinks + one blob
A_OTHER_CUT = [(0, 0, 10), (1, 10, 64)]  # the same positions cut at a shared head
B = [(1, 64, 128)]
C = [(1, 128, 192)]


def _rank_main(rank: int, init: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        agree = RankAgreement(dist.new_group([0, 1], backend="gloo"), rank, 2)
        parked = [
            (3, [A, B, C] if rank == 0 else [A, B]),  # rank 1 missed chunk 2 (dropped write, failed check)
            (3, [A, B] if rank == 0 else None),  # rank 1's prefetch still runs
            (2, [A, B] if rank == 0 else [A_OTHER_CUT, B]),  # written by servers that cut chunk 0 differently
            (2, []),  # nothing stored on either rank
        ]
        results = [agree_prefetches(agree, parked), agree_charges(agree, [100 + rank, 7 - rank])]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_release_together_and_graft_what_both_have():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank_main, args=(f"file://{tmp}/rendezvous", tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in (0, 1))
    for res in (r0, r1):
        assert res[0] == [2, NOT_DONE, 0, 0]
        assert res[1] == [101, 7]


def test_one_rank_agrees_with_itself():
    one = LocalAgreement()
    assert agree_prefetches(one, [(3, [A, B]), (2, None), (1, [])]) == [2, NOT_DONE, 0]
    assert agree_charges(one, [5, 9]) == [5, 9]


def test_a_layout_hash_names_kinds_and_positions():
    assert layout_hash(A) == layout_hash([(*s, b"blob bytes differ per rank") for s in A])
    assert len({layout_hash(A), layout_hash(A_OTHER_CUT), layout_hash(B), layout_hash([(0, 64, 128)])}) == 4
    assert 0 <= layout_hash(A) < 2**62
