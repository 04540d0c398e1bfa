"""Restores of :class:`~kvtc_sglang.cache.radix.KVTCRadixCache` (the cache holds one :class:`PathRestorer`): the
compressed part of a matched path back into fresh KV slots for an admitted request, all promised tokens or none,
with one codec call for every compressed node of the request.

While a path is restored its nodes are in the :class:`~kvtc_sglang.cache.guards.NodeGuards`' ``protect`` set:
the evict that makes room for the restore never takes them. A damaged blob (on any tensor-parallel rank) drops its
node; any other failure leaves the path compressed and the request recomputes."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from ..codec import BlobError, KVTCCodec
from ..codec.joint import MixedCodec, ResidualSource
from .controller import KVTCController
from .eviction import TreeEviction
from .guards import NodeGuards
from .joint import Reference
from .placement import BlobPlacement
from .stats import KVTCStats
from .store import BlobStore
from .surgery import TreeSurgery
from .transcode import CompressedNode, Transcoder
from .wanted import WantedBlobs

logger = logging.getLogger(__name__)


class PathRestorer:
    """Decodes compressed nodes of ``tree`` into fresh slots.

    Args:
        tree: the SGLang radix tree (its ``root_node``, allocator, ``evictable_size_``, ``evict`` and
            ``_split_node`` are used).
        guards: the nodes not to touch now (a restored path is protected while it is restored).
        surgery: paths and slots given back or given to nodes; ``eviction`` drops a node whose blob is damaged.
        io, placement, store, ctl, stats, wanted: the blob books, their placement, the blob store, the
            controller (decodes), the counters and the wanted blobs (a request admitted).
    """

    def __init__(self, tree: RadixCache, *, guards: NodeGuards, surgery: TreeSurgery, eviction: TreeEviction,
                 io: Transcoder, placement: BlobPlacement, store: BlobStore, ctl: KVTCController, stats: KVTCStats,
                 wanted: WantedBlobs) -> None:  # fmt: skip
        self.tree = tree
        self.guards = guards
        self.surgery = surgery
        self.eviction = eviction
        self.io = io
        self.placement = placement
        self.store = store
        self.ctl = ctl
        self.stats = stats
        self.wanted = wanted
        self._mixed_codec: MixedCodec | None = None  # plain and residual blobs in one restore (joint encoding)

    def load_back(self, promised: int, target: TreeNode, req: Any) -> tuple[int, TreeNode]:
        """SGLang's ``init_load_back`` for ``req`` (or ``None``), whose match promised ``promised`` tokens ending at
        ``target``: ``(promised, node ending the promised prefix)``, or ``(0, the device node the match ended
        on)`` when anything fails (no memory, a damaged blob, the path changed)."""
        path = self.surgery.path_to(target)
        first = next((i for i, n in enumerate(path) if n in self.io.entries), None)
        fallback = path[first - 1] if first else self.tree.root_node
        if req is not None:
            self.wanted.admitted(req.rid)
        if req is not None and req.last_node is not fallback:
            fallback = req.last_node
            first = None  # the tree moved under the request since its match
        if promised <= 0 or first is None:
            return 0, fallback
        region = path[first:]
        excess = sum(len(n.key) for n in region) - promised
        if not 0 <= excess < len(region[-1].key):
            self.stats.load_back_failures += 1
            return 0, fallback
        protect = self.guards.protect
        protect.update(path)
        try:
            if not self.restore_many([n for n in region if n in self.io.entries]):
                self.stats.load_back_failures += 1
                return 0, fallback
        finally:
            protect.clear()
        last = region[-1]
        if excess:
            last = self.tree._split_node(last.key, last, len(last.key) - excess)
        self.stats.load_backs += 1
        return promised, last

    def alloc_slots(self, num_tokens: int) -> torch.Tensor | None:
        """``num_tokens`` fresh slots, evicting for them if need be; ``None`` if even that would not do."""
        tree = self.tree
        allocator = tree.token_to_kv_pool_allocator
        short = num_tokens - allocator.available_size()
        if short > 0:
            if short > tree.evictable_size_ + self.store.num_slots:  # wanted blobs count: this is their restore
                return None  # even dropping every unlocked token would not do: touch nothing
            tree.evict(EvictParams(num_tokens=short))
        return allocator.alloc(num_tokens) if allocator.available_size() >= num_tokens else None

    def _references(self, entries: list[CompressedNode]) -> list[Reference | None]:
        """Each entry's shared reference (joint encoding), or ``None`` for a plain blob."""
        book = self.io.joint
        return [book.refs[e.joint.ref] if e.joint is not None and book is not None else None for e in entries]

    def _source(self, entry: CompressedNode, ref: Reference | None) -> torch.Tensor | ResidualSource:
        """What the codec reads for ``entry``: its blob, or its residual blob with its reference's."""
        blob = self.placement.fetch(entry.handle)
        if ref is None or entry.joint is None:
            return blob
        return ResidualSource(blob, self.placement.fetch(ref.handle), ref.header, entry.joint.lo, entry.joint.hi)

    def _mixed(self) -> MixedCodec:
        if self._mixed_codec is None:
            if not isinstance(self.ctl.codec, KVTCCodec):
                name = type(self.ctl.codec).__name__
                raise RuntimeError(f"joint encoding needs the KVTC codec, the cache has {name}")
            self._mixed_codec = MixedCodec(self.ctl.codec, self.ctl.joint)
        return self._mixed_codec

    def restore_many(self, nodes: list[TreeNode]) -> bool:
        """Decode compressed ``nodes`` (one path, top down) into fresh slots with one codec call; each keeps its
        blob. ``False`` if it cannot: no memory, a damaged blob (that node is dropped, the rest stay
        compressed), or any other failure of the decode (logged); the slots are given back either way."""
        entries = [self.io.entries[n] for n in nodes]
        total = sum(e.num_tokens for e in entries)
        slots = self.alloc_slots(total)  # may evict others, never the guards' ``protect``
        if slots is None:
            self.stats.restore_no_memory += 1
            return False
        parts = list(torch.split(slots, [e.num_tokens for e in entries]))  # page multiples: pages stay whole
        targets = [(p, torch.arange(e.start, e.start + e.num_tokens)) for p, e in zip(parts, entries, strict=True)]
        t0 = time.perf_counter()
        bad: int | None = None  # the damaged blob's index
        error: Exception | None = None
        refs = self._references(entries)
        try:  # every check runs before the first row is written: a bad blob leaves the slots untouched
            self.ctl.restore(
                lambda: [self._source(e, r) for e, r in zip(entries, refs, strict=True)],  # type: ignore[misc]
                [e.header for e in entries],
                targets, ready=[e.handle.ready for e in entries] + [r.handle.ready for r in refs if r is not None],
                references=[e.reference for e in entries] if self.ctl.verify else None,
                codec=self._mixed() if any(r is not None for r in refs) else None,
            )
        except BlobError as e:
            bad, error = e.blob_index or 0, e
        except (RuntimeError, ValueError, MemoryError) as e:  # CUDA OOM, nvCOMP, a bug: recompute, never wrong KV
            logger.exception("kvtc: a restore of %d tokens failed; the request recomputes them", total)
            error = e
        finally:
            self.stats.restore_seconds += time.perf_counter() - t0
        # Every rank takes the same path: a blob damaged or a decode failed on any rank is a miss on all.
        flags = [0] * (len(nodes) + 1)
        if bad is not None:
            flags[bad] = 1
        elif error is not None:
            flags[-1] = 1
        flags = self.ctl.agreement.max_each(flags)
        if any(flags):
            self.surgery.free_slots(slots)
            if any(flags[:-1]):
                victim = nodes[flags.index(1)]
                logger.warning(
                    "kvtc: dropping a compressed node of %d tokens: %s", self.io.entries[victim].node_tokens,
                    error if bad is not None else "its blob failed its checks on another tensor-parallel rank",
                )
                self.stats.checksum_failures += 1
                self.ctl.digest.mix("restore_damaged", total, flags.index(1))
                self.eviction.drop_subtree(victim)
            else:
                self.stats.restore_failures += 1
                self.ctl.digest.mix("restore_failed", total, len(nodes))
            return False
        self.ctl.digest.mix("restore", total, len(nodes))
        self.placement.count_restored(entries)
        for node, entry, part in zip(nodes, entries, parts, strict=True):
            self.io.pop(node)
            if entry.skip:
                self.surgery.free_slots(part[: entry.skip])  # rows of the part an insert took
            self.surgery.give_slots(node, part[entry.skip :])
            self.io.retain(node, replace(entry, restored=True))
            self.stats.restores += 1
            self.stats.restored_tokens += entry.node_tokens
            if entry.joint is not None:
                self.stats.joint_restored_tokens += entry.node_tokens
        return True
