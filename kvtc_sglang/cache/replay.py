"""Drive a real SGLang radix cache the way SGLang's scheduler does, without a model forward.

Used by the tests and by ``benchmarks/``: builds a real ``MHATokenToKVPool`` and token/paged allocator,
and runs "requests": match the prefix, lock it, allocate slots for the rest (evicting through the cache
when short, as SGLang's ``alloc_token_slots`` does), write the new tokens' K/V, insert the sequence,
free the duplicates the insert exposed, and unlock when the request ends.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Protocol

import torch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams, TreeLock
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from ..codec import KVTCCodec, ModelSpec
from ..codec.spec import DTYPES
from .config import KVTCCacheConfig
from .kv_io import PoolKV
from .radix import KVTCRadixCache


class KVSource(Protocol):
    def kv(self, tokens: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[L, T, H, D]`` of ``tokens[start:]`` at positions ``start..``."""


@dataclass(frozen=True)
class BankKV:
    """K/V of a real text, ``[L, N, H, D]`` each: the token at depth ``d`` gets column ``d``."""

    k: torch.Tensor
    v: torch.Tensor

    def kv(self, tokens: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(tokens) > self.k.shape[1]:
            raise ValueError(f"sequence of {len(tokens)} tokens exceeds the K/V bank of {self.k.shape[1]}")
        return self.k[:, start : len(tokens)], self.v[:, start : len(tokens)]


def build_pool(spec: ModelSpec, num_slots: int, page_size: int, device: str = "cpu"):
    """A real SGLang ``MHATokenToKVPool`` of ``num_slots`` tokens and its allocator."""
    dtype = DTYPES[spec.dtype]
    pool = MHATokenToKVPool(
        size=num_slots,
        page_size=page_size,
        dtype=dtype,
        head_num=spec.num_kv_heads,
        head_dim=spec.head_dim,
        layer_num=spec.num_layers,
        device=device,
        enable_memory_saver=False,
    )
    if page_size == 1:
        allocator = TokenToKVPoolAllocator(num_slots, dtype=dtype, device=device, kvcache=pool, need_sort=False)
    else:
        allocator = PagedTokenToKVPoolAllocator(
            num_slots, page_size, dtype=dtype, device=device, kvcache=pool, need_sort=False
        )
    return pool, allocator


def build_cache(allocator, page_size: int, codec: KVTCCodec | None = None, config: KVTCCacheConfig | None = None):
    """Vanilla ``RadixCache`` without a codec, else ``KVTCRadixCache``."""
    params = CacheInitParams(
        disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator, page_size=page_size
    )
    if codec is None:
        return RadixCache(params)
    return KVTCRadixCache(params, codec, config)


@dataclass
class Running:
    """A request that holds its cached prefix locked until :meth:`Driver.finish`."""

    tokens: list[int]
    matched: int
    lock: TreeLock | None


class Driver:
    """Scheduler-like request flow over one cache; counts hits and recomputed tokens."""

    def __init__(self, cache: RadixCache, source: KVSource) -> None:
        self.cache = cache
        self.allocator = cache.token_to_kv_pool_allocator
        pool = self.allocator.get_kvcache()
        self.kv = PoolKV(pool, len(pool.k_buffer), pool.head_num, pool.head_dim)
        self.source = source
        self.page_size = cache.page_size
        self.hit_tokens = 0
        self.computed_tokens = 0
        self.failed = 0

    def match(self, tokens: list[int]) -> tuple[int, object]:
        m = self.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
        return m.device_prefix_len, m.last_device_node

    def _alloc(self, n: int) -> torch.Tensor | None:
        short = n - self.allocator.available_size()
        if short > 0:
            self.cache.evict(EvictParams(num_tokens=short))
        return self.allocator.alloc(n) if self.allocator.available_size() >= n else None

    def start(self, tokens: list[int]) -> Running | None:
        """Admit a request: reuse the cached prefix, compute (write) the rest, insert; ``None`` if no memory."""
        ps = self.page_size
        matched, node = self.match(tokens)
        lock = self.cache.lock(node)
        prefix = self.cache.path_device_indices(node)[:matched]
        n_new = len(tokens) - matched
        slots = self._alloc(-(-n_new // ps) * ps) if n_new else prefix[:0]
        if slots is None:
            self.cache.unlock(lock)
            self.failed += 1
            return None
        slots = slots[:n_new] if ps == 1 else slots
        if n_new:
            k, v = self.source.kv(tokens, matched)
            self.kv.scatter(slots[:n_new], k, v)
        self.hit_tokens += matched
        self.computed_tokens += n_new
        aligned = len(tokens) // ps * ps
        values = torch.cat([prefix, slots[:n_new]])
        res = self.cache.insert(InsertParams(key=RadixKey(array("q", tokens[:aligned])), value=values[:aligned]))
        self.allocator.free(values[matched : res.prefix_len])  # the tree already had these tokens
        if aligned - matched < len(slots):
            self.allocator.free(slots[max(0, aligned - matched) :])  # the partial last page is not cached
        new_lock = self.cache.lock(res.last_device_node) if aligned else None
        self.cache.unlock(lock)
        return Running(tokens, matched, new_lock)

    def finish(self, req: Running) -> None:
        self.cache.unlock(req.lock)

    def read_prefix(self, tokens: list[int]) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Match ``tokens`` and read the matched prefix's K/V from the pool: ``(n, k, v)``, ``[L, n, H, D]``."""
        n, node = self.match(tokens)
        k, v = self.kv.gather(self.cache.path_device_indices(node)[:n])
        return n, k, v
