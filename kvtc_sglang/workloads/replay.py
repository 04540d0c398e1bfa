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
from sglang.srt.mem_cache.base_prefix_cache import (
    EvictParams,
    InitLoadBackParams,
    InsertParams,
    MatchPrefixParams,
    TreeLock,
)
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

from ..cache.config import KVTCCacheConfig
from ..cache.kv_io import PoolKV
from ..cache.radix import KVTCRadixCache
from ..codec import KVTCCodec, ModelSpec
from ..codec.spec import DTYPES


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
class Admission:
    """A request between match and forward: its cached prefix is locked."""

    tokens: list[int]
    matched: int
    lock: TreeLock | None
    prefix_slots: torch.Tensor  # [matched] int64


@dataclass
class Running:
    """A request that holds its cached prefix locked until :meth:`Driver.finish`."""

    tokens: list[int]
    matched: int
    lock: TreeLock | None


class Driver:
    """Scheduler-like request flow over one cache; counts hits and recomputed tokens."""

    def __init__(self, cache: RadixCache, source: KVSource | None) -> None:
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
        """A scheduler tick, then match, then (as SGLang's ``PrefillAdder`` does for an admitted request) load
        back what the match reported as not resident (``host_hit_length``): all of it or nothing."""
        self.tick()
        m = self.cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", tokens))))
        if m.host_hit_length == 0:
            return m.device_prefix_len, m.last_device_node
        loaded = self.cache.init_load_back(InitLoadBackParams(m.best_match_node, m.host_hit_length))
        if loaded is None or loaded[0] not in (0, m.host_hit_length):
            raise RuntimeError(f"init_load_back must load all {m.host_hit_length} promised tokens or none: {loaded}")
        return m.device_prefix_len + loaded[0], loaded[1]

    def _alloc(self, n: int) -> torch.Tensor | None:
        short = n - self.allocator.available_size()
        if short > 0:
            if short > self.cache.evictable_size():
                return None  # like SGLang's scheduler: a request that cannot fit waits, it does not flush the cache
            self.cache.evict(EvictParams(num_tokens=short))
        return self.allocator.alloc(n) if self.allocator.available_size() >= n else None

    def admit(self, tokens: list[int]) -> Admission:
        """Match and lock the cached prefix of ``tokens``; its slots are valid while the lock is held."""
        matched, node = self.match(tokens)
        lock = self.cache.lock(node)
        return Admission(tokens, matched, lock, self.cache.path_device_indices(node)[:matched])

    def read(self, adm: Admission) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V ``[L, matched, H, D]`` of an admitted request's cached prefix, as attention would read it."""
        return self.kv.gather(adm.prefix_slots)

    def commit(self, adm: Admission, k_new: torch.Tensor, v_new: torch.Tensor) -> Running | None:
        """Write the computed K/V ``[L, T - matched, H, D]``, insert the sequence, keep it locked.

        Returns ``None`` (and unlocks) when no slots can be found even after eviction."""
        ps, tokens, matched = self.page_size, adm.tokens, adm.matched
        n_new = len(tokens) - matched
        slots = self._alloc(-(-n_new // ps) * ps) if n_new else adm.prefix_slots[:0]
        if slots is None:
            self.cache.unlock(adm.lock)
            self.failed += 1
            return None
        slots = slots[:n_new] if ps == 1 else slots
        if n_new:
            self.kv.scatter(slots[:n_new], k_new, v_new)
        self.hit_tokens += matched
        self.computed_tokens += n_new
        aligned = len(tokens) // ps * ps
        values = torch.cat([adm.prefix_slots, slots[:n_new]])
        res = self.cache.insert(InsertParams(key=RadixKey(array("q", tokens[:aligned])), value=values[:aligned]))
        self.allocator.free(values[matched : res.prefix_len])  # the tree already had these tokens
        if aligned - matched < len(slots):
            self.allocator.free(slots[max(0, aligned - matched) :])  # the partial last page is not cached
        new_lock = self.cache.lock(res.last_device_node) if aligned else None
        self.cache.unlock(adm.lock)
        return Running(tokens, matched, new_lock)

    def tick(self) -> None:
        """What SGLang's scheduler loop does before it picks a batch: the cache's per-step work."""
        tick = getattr(self.cache, "scheduler_tick", None)
        if tick is not None:
            tick()

    def start(self, tokens: list[int]) -> Running | None:
        """Admit a request, take the rest of its K/V from the source, commit it; ``None`` if no memory."""
        adm = self.admit(tokens)
        k, v = self.source.kv(tokens, adm.matched) if adm.matched < len(tokens) else (None, None)
        return self.commit(adm, k, v)

    def finish(self, req: Running) -> None:
        self.cache.unlock(req.lock)

    def read_prefix(self, tokens: list[int]) -> tuple[int, torch.Tensor, torch.Tensor]:
        """Match ``tokens`` and read the matched prefix's K/V from the pool: ``(n, k, v)``, ``[L, n, H, D]``."""
        n, node = self.match(tokens)
        k, v = self.kv.gather(self.cache.path_device_indices(node)[:n])
        return n, k, v


def random_workload(rng, steps: int, vocab: int, max_len: int):
    """Seeded request token lists that extend, branch from and repeat earlier ones (multi-turn chats and
    shared prefixes), each with a uniform draw the caller may use for its own choices."""
    seqs: list[list[int]] = []
    for _ in range(steps):
        if seqs and rng.random() < 0.6:
            base = rng.choice(seqs[-50:])  # recent conversations come back, old ones fade
            seq = base[: rng.randint(1, len(base))] + [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        else:
            seq = [rng.randrange(vocab) for _ in range(rng.randint(1, 60))]
        seq = seq[:max_len]
        seqs.append(seq)
        yield seq, rng.random()
