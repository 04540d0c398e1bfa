"""SGLang glue: the KVTC radix cache and its parts (thin; the math is in ``kvtc_sglang.codec``)."""

from .config import KVTCCacheConfig
from .radix import KVTCRadixCache

__all__ = ["KVTCCacheConfig", "KVTCRadixCache"]
