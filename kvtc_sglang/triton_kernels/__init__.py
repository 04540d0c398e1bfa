"""Triton kernels of the KVTC codec (fused encode from KV-pool rows, fused decode into KV-pool rows).

Each module holds the ``@triton.jit`` kernel, a launcher that checks shapes, dtypes and devices, and a
plain-torch ``*_ref``. Kernels run compiled on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1``
(how CI tests them). This package imports nothing from :mod:`kvtc_sglang.codec`; the codec's Triton
payload backend (:mod:`kvtc_sglang.codec.backend_triton`) drives it.
"""

from .common import DOT_PRECISIONS, LayerTable, RopeTables, check_tensor
from .decode import decode_into, decode_into_ref
from .plan import StreamPlan
from .project import project, project_ref
from .quant_pack import dequant_ref, quant_pack, quant_pack_ref

__all__ = [
    "DOT_PRECISIONS",
    "LayerTable",
    "RopeTables",
    "StreamPlan",
    "check_tensor",
    "decode_into",
    "decode_into_ref",
    "dequant_ref",
    "project",
    "project_ref",
    "quant_pack",
    "quant_pack_ref",
]
