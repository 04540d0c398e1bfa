"""The write side of the L3 tier (:class:`~kvtc_sglang.cache.l3_tier.L3Tier` owns one): which chunk objects
are written and when, by ``write_policy`` (HiCache's names): ``write_through`` at the commit that completes a
chunk, ``write_back`` when a blob of it is about to leave the server (its node dropped from the store or host
memory). The scheduler thread only issues copies (on a GPU, to pinned memory on kvtc's host stream after the
blobs' puts, the rows fenced against reuse: ``StreamFences.freed``) and queues a function to the client's
writer thread, which waits for them, codes raw rows and frames the object; a full queue drops the write.
Keys written or fetched lately (an LRU set) are not written again.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from ..tiers.frame import pack_object
from ..tiers.keys import KeyScheme, chunk_keys, namespace_seed
from ..tiers.l3_client import L3Client
from .l3_joint import L3References
from .l3_objects import (
    JOINT,
    KVTC,
    RAW,
    RefName,
    Segment,
    chunk_ends,
    chunk_layout,
    pack_joint,
    pack_segments,
    path_of,
    path_tokens,
)
from .tree_walk import TreeNode

STORED_KEYS = 65536  # keys this server wrote or fetched lately: an offer of one is skipped


class L3Writer:
    """Offers chunk objects of one cache's tree to the L3 client.

    Args:
        cache: the tree (its ``io`` books, ``placement``, ``ctl`` fences and row access, ``stats`` are used).
        client: the store's asynchronous client (``put_async``).
        scheme: chunk size and digest of this deployment's keys.
        write_policy: ``write_through`` or ``write_back``.
        secret: the shared MAC secret, or ``None``.
        raw_codec: codes the raw segments (short device parts: the sinks, a shared template head).
        references: joint encoding's references (names a residual's reference and writes it), or ``None``.
    """

    def __init__(self, cache: Any, client: L3Client, scheme: KeyScheme, *, write_policy: str,
                 secret: bytes | None, raw_codec: Any, references: L3References | None = None) -> None:  # fmt: skip
        self.cache = cache
        self.client = client
        self.scheme = scheme
        self.write_policy = write_policy
        self.secret = secret
        self.raw_codec = raw_codec
        self.chunk = scheme.chunk_tokens
        self.references = references
        self._stored: OrderedDict[str, None] = OrderedDict()

    def committed(self, node: TreeNode, start: int) -> int:
        """A blob was committed for ``node`` (first position ``start``): write-through offers its chunk."""
        return self.offer(node, start) if self.write_policy == "write_through" else 0

    def dropping(self, node: TreeNode, order: list[tuple[TreeNode, int]]) -> int:
        """``node``'s subtree (``order``: its nodes with starts relative to ``node``'s, children first) is about
        to leave the tree, every node still attached: write-back offers the chunks of its blobs (compressed or
        kept). Returns the objects queued."""
        if self.write_policy != "write_back":
            return 0
        path = path_of(node)
        base = path[-1][1] if path else 0
        books, queued = self.cache.io, 0
        for n, rel in order:
            entry = books.entries.get(n) or books.retained.get(n)
            if entry is not None and entry.skip == 0:
                queued += self.offer(n, base + rel)
        return queued

    def offer(self, node: TreeNode, start: int) -> int:
        """A blob of ``node`` (its first position ``start``; chunk-cut, so within one chunk) is complete:
        queue the object of its chunk on every path through it that ends the chunk with blobs (and short raw
        parts) only, unless its key is known to be stored. Returns the objects queued. Only copies are issued
        here; the writer thread waits for them and builds the object."""
        c = self.chunk
        j = start // c
        lo, hi = j * c, (j + 1) * c
        queued = 0
        books = self.cache.io
        for end_node in chunk_ends(node, start + len(node.key), hi):
            layout = chunk_layout(end_node, lo, hi, lambda n: books.entries.get(n) or books.retained.get(n))
            if layout is None:
                continue
            tokens, head = path_tokens(end_node)
            seed = namespace_seed(head.extra_key, getattr(head, "cache_salt", None))
            key = chunk_keys(tokens, self.scheme, start_chunk=0, prev_hash=seed)[j]
            if key in self._stored:
                continue  # offered again: re-encoded after its kept blob was dropped, or by another node's drop
            names = [self._reference(what.joint, seed) if kind == JOINT else None for kind, _, _, what in layout]
            if any(kind == JOINT and name is None for (kind, *_), name in zip(layout, names, strict=True)):
                continue  # a reference that could not be written: the chunk would name nothing
            parts = [(kind, s_lo, s_hi, self._blob_to_host(what.handle) if kind != RAW else self._rows(what), name)
                     for (kind, s_lo, s_hi, what), name in zip(layout, names, strict=True)]  # fmt: skip
            self.cache.stats.l3_offered += 1
            if self.client.put_async(key, self._builder(key, lo, parts)):
                queued += 1
                self.remember(key)
        return queued

    def remember(self, key: str) -> None:
        """``key`` is in the store (queued by this server, or fetched from it): offers of it are skipped."""
        self._stored[key] = None
        self._stored.move_to_end(key)
        if len(self._stored) > STORED_KEYS:
            self._stored.popitem(last=False)

    def _reference(self, link: Any, seed: str | None) -> RefName | None:
        """The name of joint link ``link``'s reference, its object queued first unless known to be stored;
        ``None`` when it could not be queued (or this server has no joint encoding)."""
        if self.references is None:
            return None
        name = self.references.name(link, seed)
        if name.key in self._stored:
            return name
        data, done = self.cache.placement.host_copy(self.references.book.refs[link.ref].handle)
        if not self.client.put_async(name.key, self.references.builder(name, data, done)):
            return None
        self.cache.stats.l3_references_written += 1
        self.remember(name.key)
        return name

    def _builder(self, key: str, lo: int, parts: list[tuple[int, int, int, tuple, RefName | None]]) -> Any:
        secret, digest, raw_codec, c = self.secret, self.scheme.digest, self.raw_codec, self.chunk

        def build() -> bytes:  # on the writer thread: waits for the copies, codes raw rows, frames the object
            segments = []
            for kind, s_lo, s_hi, (tensors, copied), name in parts:
                if copied is not None:
                    copied.synchronize()
                if kind == KVTC:
                    data = tensors[0].numpy().tobytes()
                elif kind == JOINT:
                    data = pack_joint(name, tensors[0].numpy().tobytes())  # type: ignore[arg-type]
                else:
                    data = raw_codec.encode(*tensors, torch.arange(s_lo, s_hi)).numpy().tobytes()
                segments.append(Segment(kind, s_lo, s_hi, data))
            return pack_object(pack_segments(segments), key=key, digest=digest, start=lo, num_tokens=c,
                               secret=secret)  # fmt: skip

        return build

    def _blob_to_host(self, handle: Any) -> tuple[tuple[torch.Tensor], Any]:
        """A blob's bytes on the host and the event of their copy (:meth:`BlobPlacement.host_copy`: fenced, as
        write-back offers a blob just before its node is dropped and its rows freed)."""
        data, done = self.cache.placement.host_copy(handle)
        return (data,), done

    def _rows(self, slots: torch.Tensor) -> tuple[tuple[torch.Tensor, torch.Tensor], Any]:
        """Device rows' K/V ``[L, S, H, D]`` each on the host (on a GPU: read on the host stream after the
        forward's fence, copied to pinned memory; the streams that write rows and the next batch wait on the
        read, as the slots may be freed before it ends), and the copies' event."""
        ctl = self.cache.ctl
        fences = ctl.fences
        with fences.enter("host", fences.issued()):
            k, v = ctl.kv.gather(slots)  # [L, S, H, D] each
            if k.is_cuda:
                k_host = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)
                v_host = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
                k_host.copy_(k, non_blocking=True)
                v_host.copy_(v, non_blocking=True)
                k, v = k_host, v_host
        done = fences.done("host")
        fences.freed(done)
        return (k, v), done

