"""Compression of the tree of :class:`~kvtc_sglang.cache.radix.KVTCRadixCache` (the cache holds one
:class:`CompressionPlanner`): what the scheduler tick encodes in the background, how a finished encode is
committed, and how ``evict`` frees encoded nodes.

A device node goes through three states: *device* (slots only), *encoded* (slots and a kept blob: freeing
its slots is instant and loses nothing) and *compressed* (the blob only). The tick moves cold nodes from
device to encoded ahead of need, through the :class:`~kvtc_sglang.cache.controller.KVTCController`'s
worker; ``evict`` moves encoded nodes to compressed. On the scheduler's critical path only two things
encode: :meth:`CompressionPlanner.encode_for_evict`, when the encoder has fallen behind and ``evict`` would
otherwise drop cold KV (bounded to ``MAX_INLINE_TOKENS`` per call), and
:meth:`CompressionPlanner.compress_idle`, the synchronous tool and test API.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from sglang.srt.mem_cache.radix_cache import RadixCache, TreeNode

from .config import KVTCCacheConfig
from .controller import EncodeJob, KVTCController
from .eviction import TreeEviction
from .governor import EncodeGovernor
from .guards import NodeGuards, TickClock
from .joint import JointBook, JointLink, token_ids
from .joint_encode import JointPlan, chunked
from .placement import BlobPlacement
from .policy import CompressionPolicy, Span, split_at_chunks
from .ranks import agree_encodes
from .stats import KVTCStats
from .store import BlobHandle, BlobStore
from .surgery import TreeSurgery
from .transcode import CompressedNode, Transcoder
from .tree_walk import subtree_postorder
from .wanted import WantedBlobs

MAX_JOB_TOKENS = 4096  # one background job encodes at most this many tokens (about 1 s of CPU work here)
PRESSURE_TICKS = 500  # scheduler iterations after an evict during which the encoder stays awake
MAX_INLINE_TOKENS = 2048  # most tokens one evict encodes on the scheduler thread when the encoder fell behind


class CompressionPlanner:
    """Moves nodes of ``tree`` (SGLang's: its ``root_node``, ``page_size``, allocator and ``_split_node`` are used)
    from device to encoded to compressed. ``config`` gives ``idle_watermark`` and ``ready_fraction``; ``surgery``
    gives slots back, ``eviction`` makes room in the store; the rest are the cache's shared objects."""

    def __init__(self, tree: RadixCache, *, config: KVTCCacheConfig, clock: TickClock, guards: NodeGuards,
                 surgery: TreeSurgery, eviction: TreeEviction, io: Transcoder, placement: BlobPlacement,
                 policy: CompressionPolicy, store: BlobStore, ctl: KVTCController, stats: KVTCStats,
                 wanted: WantedBlobs, governor: EncodeGovernor) -> None:  # fmt: skip
        self.tree = tree
        self.config = config
        self.clock = clock
        self.guards = guards
        self.surgery = surgery
        self.eviction = eviction
        self.io = io
        self.placement = placement
        self.policy = policy
        self.store = store
        self.ctl = ctl
        self.stats = stats
        self.wanted = wanted
        self.governor = governor
        self.l3: Any = None  # the L3 tier (:mod:`~kvtc_sglang.cache.l3_tier`): chunk cuts, write-through
        self.joint: JointBook | None = None  # joint encoding across requests (:mod:`~kvtc_sglang.cache.joint`)

    # ----- the background: plan at a tick, commit at a later one -----

    def plan_background(self) -> None:
        """Queue one encode of the coldest nodes while the encoder is awake (the pool more than
        ``idle_watermark`` used, or an evict within ``PRESSURE_TICKS`` ticks) and free slots plus encoded
        nodes (locked ones too: freeable when their request ends) cover less than ``ready_fraction`` of the
        pool; nothing while a job is queued. Tick counts, not clocks: every rank of a tensor-parallel group
        would decide alike."""
        if self.ctl.pending or self.governor.paused:
            return
        allocator = self.tree.token_to_kv_pool_allocator
        free = allocator.available_size()
        awake = self.clock.awake(PRESSURE_TICKS)
        if not awake and allocator.size - free <= self.config.idle_watermark * allocator.size:
            return
        short = int(self.config.ready_fraction * allocator.size) - free
        # encoded nodes, locked ones included, are freeable as soon as their request ends
        if short <= 0 or (short := short - self.stats.retained_tokens) <= 0:
            return
        spans = self.policy.take(min(short, MAX_JOB_TOKENS), self._storable_now(), now=time.monotonic())
        targets, plans = self._planned(self._worth_storing(spans))
        if targets:
            job = self.ctl.submit([(node, node.value, lo) for node, lo in targets], plans)
            self.guards.reading(job, [node for node, _ in targets])

    def _blob_bytes_estimate(self, num_tokens: int) -> float:
        return num_tokens * self.io.token_bytes / max(self.stats.store_ratio, 8.0)

    def _storable_now(self) -> Callable[[TreeNode], bool]:
        """The ``busy`` test of a background plan: nodes the guards call unreadable, and locked nodes whose blobs
        the store could not take at commit. A locked node cannot give its own slots to the store, so its blob
        needs free bytes on the store's pages or free pool pages to borrow; with none (a pool full of running
        requests) its encode would be thrown away (``store_full``) and repeated later. Unlocked nodes always
        fit: their own slots make the room. The room is a running budget over the nodes taken, in bytes."""
        store, ps = self.store, self.tree.page_size
        borrow = min(store.max_pages - store.num_pages, self.tree.token_to_kv_pool_allocator.available_size() // ps)
        room = store.free_bytes + borrow * store.blocks_per_page * store.row_bytes

        def busy(node: TreeNode) -> bool:
            nonlocal room
            if self.guards.unreadable(node):
                return True
            if node.lock_ref == 0:
                return False
            need = self._blob_bytes_estimate(len(node.key))
            if need > room:
                self.stats.encodes_deferred += 1
                return True
            room -= need
            return False

        return busy

    def _worth_storing(self, spans: list[Span]) -> list[Span]:
        """Spans whose blobs the store can take without dropping a more recently used blob (all of them with a
        host tier: the store's older blobs move to host memory)."""
        est = self._blob_bytes_estimate(sum(hi - lo for _, _, lo, hi in spans))
        if est <= self.store.room_bytes or self.placement.has_host:
            return spans  # (with a host tier the store's older blobs move there rather than being dropped)
        stamps = [s for s in (self.policy.encoded.oldest_stamp(), self.policy.compressed.oldest_stamp()) if s]
        oldest = min(stamps, default=float("inf"))
        return [s for s in spans if s[0].last_access_time > oldest]

    def _cut(self, spans: list[Span], chunk: int) -> list[tuple[TreeNode, int]]:
        """Split each span's node so that one node covers exactly ``[lo, hi)`` (and each piece of it between
        multiples of ``chunk`` positions, if ``chunk``): ``(node, lo)``. The parts keep the node's stamp (a cut is
        no access: the LRU order stays as it was)."""
        out = []
        for cand, start, lo, hi in split_at_chunks(spans, chunk):
            if cand.parent is None or cand.value is None:
                continue  # compressed or dropped while making room for an earlier span
            if lo > start:
                self._head(cand, lo - start)  # cand keeps [lo, end)
            target = cand
            if hi < lo + len(cand.key):
                target = self._head(cand, hi - lo)  # the new parent covers [lo, hi)
            out.append((target, lo))
        return out

    def _head(self, node: TreeNode, n: int) -> TreeNode:
        """Split ``node`` after ``n`` tokens: the new parent (its first ``n``) keeps the node's stamp (a cut is no
        access: the LRU order stays as it was); ``node`` keeps the rest."""
        stamp = node.last_access_time
        head = self.tree._split_node(node.key, node, n)
        head.last_access_time = stamp
        return head

    def _planned(self, spans: list[Span]) -> tuple[list[tuple[TreeNode, int]], list | None]:
        """Encode targets of ``spans``, cut at L3 chunk boundaries (with an L3 tier), and with joint encoding on
        each span matching text another branch holds one node (matched on whole spans, then cut at chunks), and
        each target's plan (``None``: a plain blob)."""
        chunk = self.l3.chunk if self.l3 is not None else 0
        if self.joint is None:
            return self._cut(spans, chunk), None
        planned = self.joint.split(self._cut(spans, 0), self._head)
        if chunk:
            planned = chunked(planned, chunk, self._head, self.joint)
        return [(node, lo) for node, lo, _ in planned], [plan for _, _, plan in planned]

    def commit(self, jobs: list[EncodeJob]) -> None:
        """Store the blobs of finished jobs: their nodes become encoded (or compressed, when the store could
        only borrow a page by freeing the node's own slots). A node that changed since (split, dropped, given
        other slots) discards its blob. Under tensor parallelism every rank commits the same jobs and reserves
        the largest rank's size for each blob, so every decision below is the same on every rank."""
        if not jobs:
            return
        reserves = agree_encodes(self.ctl.agreement, jobs)
        digest = self.ctl.digest
        for job, (reserve, ref_reserves) in zip(jobs, reserves, strict=True):
            self.guards.done(job)
            if not job.results:
                self.stats.discarded_encodes += len(job.targets)
                digest.mix("encode_failed", job.num_tokens, len(job.targets))
            self.stats.compress_seconds += job.seconds
            refs = job.references or [None] * len(job.results)
            plans = job.plans or [None] * len(job.results)
            groups: dict[int, int] = {}  # a new reference's group -> its id (pinned while this job commits)
            for i, ((node, slots, lo), (blob, header), ref, size, plan) in enumerate(zip(
                job.targets, job.results, refs, reserve, plans, strict=False
            )):
                if node.parent is None or node.value is not slots or node in self.io.retained:
                    self.stats.discarded_encodes += 1
                    digest.mix("discard", len(slots), lo)
                    self.policy.touch_path(node if node.parent is not None else None)
                    continue
                link = self._joint_link(node, plan, job.made.get(i), ref_reserves.get(i, 0), groups)
                if plan is not None and link is None:
                    self.policy.touch_path(node)
                    continue  # its reference went, or could not be stored
                handle = self._store_blob(node, blob, size)
                if handle is None and self.placement.has_host:  # the store cannot take it: host memory may
                    handle = self.placement.adopt(blob, job.done_event, max(size, blob.numel()), node,
                                                  spared=self.guards.protect, drop_subtree=self.eviction.drop_subtree)
                if handle is None:
                    self.stats.store_full_tokens += len(slots)
                    digest.mix("store_full", len(slots), lo)
                    if link is not None:
                        self.joint.abandon(link.ref)  # type: ignore[union-attr]  # (a link means joint is on)
                    if node.value is None:  # a new reference took its slots' pages, and its residual found no room
                        self.eviction.drop_subtree(node)
                    continue  # the store is full of more recently used blobs
                entry = self.io.make_entry(handle, lo, len(slots), header, reference=ref, joint=link)
                if self.joint is not None and plan is None:
                    self.joint.remember(node)  # a later copy of this text makes a reference
                self.stats.encodes += 1
                self.stats.encoded_tokens += len(slots)
                digest.mix("encode", len(slots), lo)
                if node.value is None:  # its slots made room for the store: compressed already
                    self._count_compression(node, entry)
                else:
                    self.io.retain(node, entry)
                if self.l3 is not None:  # write-through: the chunk of this blob, once blobs cover it
                    self.l3.writer.committed(node, lo)
            for plan in job.plans:  # the references this job's encodes read are no longer pinned by it
                if plan is not None and plan.ref is not None and self.joint is not None:
                    self.joint.unpin(plan.ref)
            for ref_id in groups.values():
                self.joint.unpin(ref_id)  # type: ignore[union-attr]  # (groups exist only with joint encoding)

    def _joint_link(self, node: TreeNode, plan: JointPlan | None, made: tuple | None, reserve: int,
                    groups: dict[int, int]) -> JointLink | None:
        """The reference a planned target's residual blob decodes against: the plan's, if it is still stored, or
        the new one the encoder made (stored now, at its first piece, in ``reserve`` bytes, the ranks' largest;
        ``groups``: the new references of this job's pieces); ``None`` for a plain target or when that fails."""
        if plan is None or self.joint is None:
            return None
        ref = plan.ref if plan.ref is not None else groups.get(plan.group) if plan.group else None
        if ref is not None:
            if self.joint.alive(ref):
                return JointLink(ref, plan.lo, plan.hi)
        elif made is not None:
            blob, header = made
            handle = self._store_blob(node, blob, reserve)  # may free the node's slots: the residual keeps it
            if handle is not None:
                ref = self.joint.add_reference(handle, header, node, plan.tokens or token_ids(node))
                if plan.group:
                    self.joint.pin(ref)  # its later pieces link to it in this commit, whatever happens to this one
                    groups[plan.group] = ref
                return JointLink(ref, plan.lo, plan.hi)
        self.stats.joint_discards += 1
        self.ctl.digest.mix("joint_discard", len(node.key), 0)
        return None

    def _count_compression(self, node: TreeNode, entry: CompressedNode) -> None:
        self.ctl.digest.mix("compress", entry.node_tokens, entry.start + entry.skip)
        self.io.add(node, entry)
        self.wanted.mark(node, self.clock.ticks)  # fresh: its owner's next turn may be about to come back
        self.stats.compressions += 1
        self.stats.compressed_tokens += entry.num_tokens

    def _store_blob(self, node: TreeNode, blob: torch.Tensor, reserve: int) -> BlobHandle | None:
        """Put ``blob`` in the store in ``reserve`` bytes (at least its own size; the ranks' largest under
        tensor parallelism), dropping other blobs for room if the store is at its cap. When the pool has no
        free page for the store to borrow, the node's own slots are released first (the blob is smaller than
        its raw KV); its ``value`` is then ``None`` on return."""
        store, ps = self.store, self.tree.page_size
        reserve = max(reserve, blob.numel())
        pages = store.pages_needed(reserve)
        if store.num_pages + pages > store.max_pages:
            self.eviction.make_store_room(pages, keep=node)
            pages = store.pages_needed(reserve)
        if store.num_pages + pages > store.max_pages:
            self.stats.store_full += 1
            return None
        allocator = self.tree.token_to_kv_pool_allocator
        release = allocator.available_size() < pages * ps
        if release and (node.value is None or len(node.value) < pages * ps or allocator.free_group is not None
                        or node.lock_ref > 0):
            self.stats.store_full += 1
            return None
        if release:
            self.surgery.release_slots(node)
        handle = self.ctl.put(store, blob, reserve)
        if handle is None and release:
            raise RuntimeError(f"kvtc: freed slots did not make room for a {blob.numel()}-byte blob")
        return handle

    # ----- evict: encoded -> compressed -----

    def free_encoded(self, need: int | None, now: float | None = None) -> int:
        """Free the slots of encoded, unlocked nodes (LRU first) whose whole node may be compressed (sinks and
        windows stay exact) until ``need`` slots are free (all for ``None``); idle ones only when ``now``
        is given. Instant: nothing is encoded."""
        freed, passed = 0, []
        while need is None or freed < need:
            node = self.policy.encoded.pop()
            if node is None:
                break
            if node not in self.io.retained or node.value is None:
                continue
            if now is not None and now - node.last_access_time < self.policy.idle_seconds:
                passed.append(node)
                break
            n = self._compress_encoded(node)
            if not n:
                passed.append(node)  # locked, or its window covers it now
            freed += n
        for node in passed:
            self.policy.encoded.add(node)
        return freed

    def _compress_encoded(self, node: TreeNode) -> int:
        """Free encoded ``node``'s slots (it keeps its blob, now its only copy); 0 if it may not be compressed
        now (locked, being restored or encoded). The blob covers exactly the node and never a sink; a
        window that covers it now (the leaf below was evicted since the encode) does not keep it: its
        slots would otherwise go next with the KV, where the blob keeps it."""
        if self.guards.busy(node):
            return 0
        entry = self.io.take_retained(node)
        freed = self.surgery.release_slots(node)
        if entry.restored:
            self.stats.reused_blobs += 1
            self.stats.reused_tokens += entry.num_tokens
        self._count_compression(node, entry)
        return freed

    def encode_for_evict(self, need: int) -> int:
        """The encoder fell behind: nothing encoded is left and the next step would drop cold device KV. Encode
        the coldest unlocked nodes on the scheduler thread (at most ``MAX_INLINE_TOKENS``, counted in
        ``inline_encoded_tokens``) and free them, so that the KV stays cached compressed; returns the slots
        freed net of the store pages the blobs took. A job the worker is running is not waited for (its
        nodes are passed over)."""
        if self.governor.paused:
            return 0  # its blobs are being dropped unused: drop the KV as SGLang would, without the encode
        budget = min(MAX_INLINE_TOKENS, need + need // 8 + self.tree.page_size)  # blobs take a few pages back
        targets, plans = self._planned(self.policy.take(budget, self.guards.busy))
        if not targets:
            return 0
        allocator = self.tree.token_to_kv_pool_allocator
        before = allocator.available_size()
        job = self.ctl.encode_now([(node, node.value, lo) for node, lo in targets], plans)
        self.stats.inline_encodes += 1
        self.stats.inline_encoded_tokens += job.num_tokens
        self.commit([job])
        for node, _ in targets:
            if node in self.io.retained:
                self._compress_encoded(node)
        return allocator.available_size() - before

    # ----- tools and tests -----

    def compress_idle(self, now: float | None = None) -> int:
        """Compress every eligible node idle for ``idle_seconds`` at ``now``, whatever the pool usage,
        encoding on the calling thread; returns the slots freed net of store growth (tools, tests)."""
        now = time.monotonic() if now is None else now
        for job in self.ctl.drain():
            self.commit([job])
        allocator = self.tree.token_to_kv_pool_allocator
        before = allocator.available_size()
        for node, _ in subtree_postorder(self.tree.root_node):  # a tool may walk: every device node is a candidate
            if node.parent is not None and node.value is not None:
                self.policy.candidates.add(node)
        self.free_encoded(None, now)
        targets, plans = self._planned(self.policy.take(None, self.guards.busy, now))
        if targets:
            self.commit([self.ctl.encode_now([(node, node.value, lo) for node, lo in targets], plans)])
            for node, _ in targets:  # idle when taken (a split gave the head a new stamp)
                if node in self.io.retained:
                    self._compress_encoded(node)
        return allocator.available_size() - before
