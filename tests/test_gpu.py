"""GPU paths: nvCOMP raw DEFLATE interoperates with CPU zlib, and GPU decode matches CPU decode.

Skipped without CUDA. On a GPU machine without the model package, point ``KVTC_GPU_BUNDLE`` at a
folder made by ``python benchmarks/gpu_bundle.py`` (a real artifact and real K/V).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from kvtc_sglang.codec import BlobChecksumError, KVTCCodec, ZlibDeflate, load_artifact, nvcomp_available

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not nvcomp_available(), reason="needs nvidia-nvcomp (pip install 'kvtc-sglang[gpu]')"),
]


@pytest.fixture(scope="module")
def bundle(request):
    torch.backends.cuda.matmul.allow_tf32 = False
    folder = os.environ.get("KVTC_GPU_BUNDLE")
    if folder:
        from safetensors.torch import load_file

        art = load_artifact(next(Path(folder).glob("*.kvtc.safetensors")))
        kv = load_file(str(Path(folder) / "kv.safetensors"))
        return art, kv["k"], kv["v"], kv["positions"]
    art = request.getfixturevalue("artifact")
    k, v, pos = request.getfixturevalue("real_kv")
    return art, k, v, pos


def test_nvcomp_blob_decodes_on_cpu_and_zlib_blob_decodes_on_gpu(bundle):
    art, k, v, pos = bundle
    gpu = KVTCCodec(art)  # nvCOMP for CUDA tensors
    cpu = KVTCCodec(art, entropy=ZlibDeflate())
    blob_gpu = gpu.encode(k.cuda(), v.cuda(), pos.cuda())
    assert blob_gpu.is_cuda
    k_cpu, v_cpu, _ = cpu.decode(blob_gpu.cpu())  # nvCOMP stream inflated by zlib
    k_gpu, v_gpu, _ = gpu.decode(blob_gpu)
    torch.testing.assert_close(k_gpu.cpu().float(), k_cpu.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(v_gpu.cpu().float(), v_cpu.float(), atol=2e-2, rtol=2e-2)
    blob_cpu = cpu.encode(k, v, pos)
    k2, v2, _ = gpu.decode(blob_cpu.cuda())  # zlib stream inflated by nvCOMP
    k3, v3, _ = cpu.decode(blob_cpu)
    torch.testing.assert_close(k2.cpu().float(), k3.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(v2.cpu().float(), v3.float(), atol=2e-2, rtol=2e-2)


def test_gpu_payload_matches_cpu_payload(bundle):
    """Same quantized bytes on both devices, up to codes that sit on a rounding boundary."""
    art, k, v, pos = bundle
    codec = KVTCCodec(art, entropy=ZlibDeflate())
    p_cpu = codec.quantize(*codec.transform(k, v, pos))
    p_gpu = codec.quantize(*codec.transform(k.cuda(), v.cuda(), pos.cuda())).cpu()
    assert p_cpu.shape == p_gpu.shape
    assert (p_cpu == p_gpu).float().mean() > 0.98


def test_corrupt_chunk_is_caught_before_nvcomp(bundle):
    art, k, v, pos = bundle
    gpu = KVTCCodec(art)
    blob = gpu.encode(k.cuda(), v.cuda(), pos.cuda()).clone()
    header = gpu.read_header(blob)
    blob[header.data_offset + 3] ^= 0x10
    with pytest.raises(BlobChecksumError):
        gpu.decode(blob)
