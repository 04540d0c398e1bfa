"""SGLang glue: the KVTC radix cache and its parts (thin; the math is in ``kvtc_sglang.codec``).

``KVTCRadixCache`` (which imports SGLang) is loaded on first use, so the parts that do not need SGLang (the
controller, the stream fences, the blob store) import without it, as on the lent GPU machine's image."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import KVTCCacheConfig
    from .radix import KVTCRadixCache

__all__ = ["KVTCCacheConfig", "KVTCRadixCache"]


def __getattr__(name: str) -> Any:
    if name == "KVTCCacheConfig":
        from .config import KVTCCacheConfig

        return KVTCCacheConfig
    if name == "KVTCRadixCache":
        from .radix import KVTCRadixCache

        return KVTCRadixCache
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
