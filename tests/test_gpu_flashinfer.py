"""GPU: pages restored by KVTCRadixCache, read by FlashInfer's paged decode, give the original attention.

Skipped without CUDA or flashinfer (``pip install 'kvtc-sglang[gpu]'``). The pool, allocator and cache are
SGLang's real classes on ``cuda``; the codec runs its torch path with nvCOMP. Queries are real key vectors
of the same text (a stand-in for the model's queries with the same statistics).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("sglang")  # the cache imports SGLang; the GPU image lacks it unless it travels

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.codec import KVTCCodec, nvcomp_available
from kvtc_sglang.workloads.replay import BankKV, Driver, build_cache, build_pool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="needs flashinfer"),
    pytest.mark.skipif(not nvcomp_available(), reason="needs nvidia-nvcomp (pip install 'kvtc-sglang[gpu]')"),
]


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``q [Hq, D]``, ``k, v [T, H, D]`` -> ``[Hq, D]`` float32 (grouped-query attention, no mask)."""
    group = q.shape[0] // k.shape[1]
    kk, vv = k.float().repeat_interleave(group, 1), v.float().repeat_interleave(group, 1)  # [T, Hq, D]
    scores = torch.einsum("hd,thd->ht", q.float(), kk) / q.shape[-1] ** 0.5
    return torch.einsum("ht,thd->hd", scores.softmax(-1), vv)


@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_reads_restored_pages(artifact, kv_bank, page_size):
    import flashinfer

    spec = artifact.spec
    _, allocator = build_pool(spec, 4096, page_size, device="cuda")
    cache = build_cache(allocator, page_size, KVTCCodec(artifact), KVTCCacheConfig(calibration="t"))
    k_all, v_all = (t.cuda() for t in kv_bank)
    drv = Driver(cache, BankKV(k_all, v_all))
    seq = list(range(640))
    drv.finish(drv.start(seq))
    assert cache.compress_idle(now=float("inf")) > 0
    adm = drv.admit(seq)  # restores the compressed node into fresh pool pages
    n = adm.matched
    assert n == 640 and cache.stats.restores == 1
    slots = adm.prefix_slots
    pages = slots[::page_size] // page_size  # [n / P] page ids, as SGLang's req_to_token rows give them
    hq = spec.num_kv_heads * 3
    q = k_all[5, 700, :, :].repeat_interleave(3, 0).contiguous()  # [Hq, D], a real later key as query
    layer = 5
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        torch.empty(128 << 20, dtype=torch.uint8, device="cuda"), kv_layout="NHD"
    )
    wrapper.plan(
        torch.tensor([0, pages.numel()], dtype=torch.int32, device="cuda"),
        pages.to(torch.int32),
        torch.tensor([page_size], dtype=torch.int32, device="cuda"),
        hq, spec.num_kv_heads, spec.head_dim, page_size,
        q_data_type=q.dtype, kv_data_type=q.dtype,
    )
    kb = drv.kv.k_buffers[layer].view(-1, page_size, spec.num_kv_heads, spec.head_dim)  # [pages, P, H, D]
    vb = drv.kv.v_buffers[layer].view(-1, page_size, spec.num_kv_heads, spec.head_dim)
    out = wrapper.run(q[None], (kb, vb))[0].float()  # [Hq, D]
    restored = attention_ref(q, drv.kv.k_buffers[layer][slots], drv.kv.v_buffers[layer][slots])
    original = attention_ref(q, k_all[layer, :n], v_all[layer, :n])
    torch.testing.assert_close(out, restored, atol=2e-2, rtol=2e-2)  # FlashInfer reads the pages we wrote
    err = (out - original).norm() / original.norm()
    assert err < 0.1, f"attention over restored pages differs from the original by {err:.3f}"
    drv.cache.unlock(adm.lock)
