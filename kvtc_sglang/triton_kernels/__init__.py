"""Triton kernels of the KVTC codec (fused encode from KV-pool rows, fused decode into KV-pool rows).

Each module holds the ``@triton.jit`` kernel, a launcher that checks shapes, dtypes and devices, and a
plain-torch ``*_ref``. Kernels run compiled on CUDA tensors, or on the CPU under ``TRITON_INTERPRET=1``
(how CI tests them). The codec chooses them for CUDA tensors: see :class:`~kvtc_sglang.codec.KVTCCodec`.
"""

from .common import LayerTable
from .decode import decode_into, decode_into_ref
from .plan import StreamPlan
from .project import project, project_ref
from .quant_pack import quant_pack, quant_pack_ref

__all__ = [
    "LayerTable",
    "StreamPlan",
    "decode_into",
    "decode_into_ref",
    "project",
    "project_ref",
    "quant_pack",
    "quant_pack_ref",
]
