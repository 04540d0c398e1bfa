"""Joint encoding across requests in the cache (``--kvtc-joint-calibration``): text that another radix branch already
holds is stored as a small residual against one shared *reference* blob instead of a KVTC blob of its own.

The radix tree shares exact prefixes only: agents that read the same file after different histories each hold a
copy. :class:`JointBook` keeps a :class:`~.content_index.ContentIndex` of token spans per namespace (a LoRA's
``extra_key`` and a tenant's ``cache_salt`` never share): the text of every plain blob encoded lately ("seen",
bounded) and of every reference. When the planner is about to encode a node, :meth:`JointBook.split` finds spans of
at least ``min_tokens`` that match (exact token ids, any offset) and cuts the node so that each match is one node:

- a match of a reference becomes a residual blob against that reference's span;
- a match of seen text (the text's second copy) becomes a new reference, coded from this node's exact rows at the
  reference calibration's ratio (8x), and this node's blob a residual against it.

A reference is pinned while any blob depends on it, or any queued encode reads it, and freed with its last
dependant (``dependants``); it lives in the pool's blob store beside the other blobs and is never an eviction
victim itself. The codec work runs where the
node's own encode runs (:mod:`~.controller`); a restore decodes references and residuals in the same restore call
(:class:`~kvtc_sglang.codec.joint.MixedCodec`). Decisions depend on token ids and counts only: every rank of a
tensor-parallel group takes them alike; each rank's reference blobs are reserved at the ranks' largest size
(:func:`~.ranks.agree_encodes`). In the L3 tier a residual's chunk object names its reference, an object of its own
(:mod:`~.l3_joint`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

from ..codec.blob import BlobHeader
from .content_index import ContentIndex
from .joint_encode import JointPlan
from .stats import KVTCStats
from .store import BlobHandle
from .tree_walk import TreeNode


@dataclass(frozen=True)
class JointLink:
    """A residual blob's reference: ``ref`` (a :class:`Reference` id) and the span ``[lo, hi)`` of its tokens."""

    ref: int
    lo: int
    hi: int


@dataclass
class Reference:
    """A shared reference blob: its tokens (ids; empty for one fetched from the L3, which is not indexed), where it
    is stored, how many blobs depend on it, and its L3 object key once it has one (:mod:`~.l3_joint`)."""

    id: int
    handle: BlobHandle
    header: BlobHeader
    tokens: tuple[int, ...]
    namespace: tuple
    dependants: int = 0
    key: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.tokens) or self.header.num_tokens


def _of_kind(kind: str) -> Callable[[Hashable], bool]:
    return lambda owner: isinstance(owner, tuple) and owner[0] == kind


def namespace_of(node: TreeNode) -> tuple:
    """Which nodes may share: the same LoRA (``extra_key``) and tenant salt (``cache_salt``)."""
    return (getattr(node.key, "extra_key", None), getattr(node.key, "cache_salt", None))


def token_ids(node: TreeNode) -> tuple[int, ...]:
    return tuple(node.key.raw_token_ids())


class JointBook:
    """References, the content indexes and the planner's cuts.

    Args:
        fetch: a stored blob's bytes (``placement.fetch``); ``free``: give a reference's blob back.
        stats: the counters (``joint_*``).
        page_size: cuts land on page multiples of a node.
        min_tokens: the shortest match worth a residual (and worth a reference).
        seen_tokens: how many tokens of plain blobs the index remembers (oldest forgotten first).
    """

    def __init__(self, *, fetch: Callable[[BlobHandle], Any], free: Callable[[BlobHandle], None], stats: KVTCStats,
                 page_size: int, min_tokens: int, seen_tokens: int) -> None:  # fmt: skip
        if min_tokens < 2 * page_size or seen_tokens < min_tokens:
            raise ValueError(f"joint encoding needs min_tokens >= 2 pages ({2 * page_size}) and seen_tokens >= "
                             f"min_tokens, got {min_tokens} and {seen_tokens}")
        self._fetch = fetch
        self._free = free
        self.stats = stats
        self.page_size = page_size
        self.min_tokens = min_tokens
        self.seen_tokens = seen_tokens
        self._indexes: dict[tuple, ContentIndex] = {}
        self._seen: OrderedDict[tuple, int] = OrderedDict()  # ("seen", n, namespace) -> tokens, oldest first
        self._seen_total = 0
        self._last: tuple[Any, tuple | None, tuple[int, ...]] = (None, None, ())  # the last node remembered
        self._next = 0
        self.refs: dict[int, Reference] = {}
        self.by_key: dict[str, int] = {}  # L3 object key -> reference id

    def _index(self, namespace: tuple) -> ContentIndex:
        if namespace not in self._indexes:
            self._indexes[namespace] = ContentIndex(window=max(16, self.page_size), min_tokens=self.min_tokens)
        return self._indexes[namespace]

    # ----- what was encoded -----

    def remember(self, node: TreeNode) -> None:
        """``node``'s text went into a plain blob: a later copy of it makes a reference. A node right below the
        last one remembered (the next piece of a target cut at L3 chunks) extends that text."""
        tokens = token_ids(node)
        ns = namespace_of(node)
        last_node, last_seen, last_tokens = self._last
        if last_node is not None and getattr(node, "parent", None) is last_node:
            tokens = last_tokens + tokens
            if last_seen is not None:
                self._forget(last_seen)
        self._last = (node, None, tokens)
        if len(tokens) < self.min_tokens:
            return
        self._next += 1
        seen = (("seen", self._next), ns)
        self._index(ns).add(seen[0], tokens)
        self._seen[seen] = len(tokens)
        self._seen_total += len(tokens)
        self._last = (node, seen, tokens)
        while self._seen_total > self.seen_tokens:
            self._forget(next(iter(self._seen)))

    def _forget(self, seen: tuple) -> None:
        """Drop ``seen = (owner, namespace)`` from the index (gone already: nothing)."""
        n = self._seen.pop(seen, None)
        if n is not None:
            self._index(seen[1]).remove(seen[0])
            self._seen_total -= n

    def add_reference(self, handle: BlobHandle, header: BlobHeader, node: TreeNode, tokens: tuple[int, ...]) -> int:
        """A new reference stored at ``handle``, made of ``node``'s ``tokens``: its id (no dependant yet)."""
        ref_id = self._add(handle, header, tokens, namespace_of(node))
        self.stats.joint_references_made += 1
        return ref_id

    def adopt(self, key: str, handle: BlobHandle, header: BlobHeader, node: TreeNode) -> int:
        """A reference fetched from the L3 under ``key`` (in host memory at ``handle``), for blobs grafted under
        ``node``'s namespace: its id (no dependant yet; not indexed, its token ids are not known)."""
        ref_id = self._add(handle, header, (), namespace_of(node))
        self.keyed(ref_id, key)
        self.stats.joint_references_fetched += 1
        return ref_id

    def _add(self, handle: BlobHandle, header: BlobHeader, tokens: tuple[int, ...], namespace: tuple) -> int:
        self._next += 1
        ref = Reference(self._next, handle, header, tokens, namespace)
        self.refs[ref.id] = ref
        if tokens:
            self._index(ref.namespace).add(("ref", ref.id), tokens)
        s = self.stats
        s.joint_references += 1
        s.joint_reference_tokens += ref.num_tokens
        s.joint_reference_bytes += handle.nbytes
        return ref.id

    def keyed(self, ref_id: int, key: str) -> None:
        """Reference ``ref_id`` is L3 object ``key`` (named by a chunk written, or fetched)."""
        self.refs[ref_id].key = key
        self.by_key[key] = ref_id

    def depend(self, link: JointLink, num_tokens: int, nbytes: int) -> None:
        """A residual blob of ``num_tokens`` tokens (``nbytes``) now depends on ``link.ref``."""
        self.refs[link.ref].dependants += 1
        self.stats.joint_residual_blobs += 1
        self.stats.joint_residual_tokens += num_tokens
        self.stats.joint_residual_bytes += nbytes

    def release(self, link: JointLink, num_tokens: int, nbytes: int) -> None:
        """A dependant of ``link.ref`` was freed; the reference goes with its last one."""
        s = self.stats
        s.joint_residual_blobs -= 1
        s.joint_residual_tokens -= num_tokens
        s.joint_residual_bytes -= nbytes
        self.refs[link.ref].dependants -= 1
        self.abandon(link.ref)

    def abandon(self, ref_id: int) -> None:
        """Free reference ``ref_id`` if nothing depends on it (a new one whose first dependant was not stored)."""
        ref = self.refs[ref_id]
        if ref.dependants > 0:
            return
        s = self.stats
        del self.refs[ref.id]
        if ref.key is not None:
            self.by_key.pop(ref.key, None)
        if ref.tokens:
            self._index(ref.namespace).remove(("ref", ref.id))
        self._free(ref.handle)
        s.joint_references -= 1
        s.joint_reference_tokens -= ref.num_tokens
        s.joint_reference_bytes -= ref.handle.nbytes
        s.joint_references_dropped += 1

    def pin(self, ref_id: int) -> None:
        """An encode planned against ``ref_id`` is queued: keep the reference until it is committed."""
        self.refs[ref_id].dependants += 1

    def unpin(self, ref_id: int) -> None:
        """That encode was committed (or thrown away): the reference goes if nothing else depends on it."""
        self.refs[ref_id].dependants -= 1
        self.abandon(ref_id)

    def alive(self, ref: int | None) -> bool:
        return ref is None or ref in self.refs

    def clear(self) -> None:
        """Forget everything (the cache's reset: every blob was freed already)."""
        for ref in self.refs.values():
            self._free(ref.handle)
        self.refs.clear()
        self.by_key.clear()
        self._indexes.clear()
        self._seen.clear()
        self._seen_total = 0
        self._last = (None, None, ())
        s = self.stats
        s.joint_references = s.joint_reference_tokens = s.joint_reference_bytes = 0
        s.joint_residual_blobs = s.joint_residual_tokens = s.joint_residual_bytes = 0

    # ----- planning -----

    def matches(self, node: TreeNode) -> list[tuple[int, int, JointPlan]]:
        """Page-aligned ``(start, length, plan)`` spans of ``node`` (offsets in its key) that match a reference or
        seen text, left to right, each at least ``min_tokens``."""
        ps = self.page_size
        out: list[tuple[int, int, JointPlan]] = []
        index = self._indexes.get(namespace_of(node))
        if index is None or not len(index):
            return out
        tokens = token_ids(node)
        refs = index.find(tokens, accept=_of_kind("ref"))  # a reference first, where there is one
        seen = [m for m in index.find(tokens, accept=_of_kind("seen"))
                if all(m.start + m.length <= r.start or r.start + r.length <= m.start for r in refs)]
        for m in sorted(refs + seen, key=lambda m: m.start):
            start = -(-m.start // ps) * ps
            end = (m.start + m.length) // ps * ps
            if end - start < self.min_tokens:
                continue
            lo = m.owner_start + start - m.start
            kind, key = cast(tuple[str, int], m.owner)  # the owners this book adds: ("ref" | "seen", n)
            if kind == "ref":
                ref: Reference = self.refs[key]
                self.pin(ref.id)  # its encode reads the reference's bytes: they stay until the commit
                out.append((start, end - start, JointPlan(
                    ref.id, lo, lo + end - start, fetch=partial(self._fetch, ref.handle), header=ref.header,
                    ready=ref.handle.ready)))
            else:  # the text's second copy makes its reference: no other copy makes one of the same text meanwhile
                self._forget((m.owner, namespace_of(node)))
                out.append((start, end - start, JointPlan(None, 0, end - start, tokens=tokens[start:end])))
        self.stats.joint_matches += len(out)
        return out

    def new_group(self) -> int:
        """A fresh id for the pieces of one new reference (:func:`~.joint_encode.chunked`)."""
        self._next += 1
        return self._next

    def split(self, targets: list[tuple[TreeNode, int]], cut: Callable[[TreeNode, int], TreeNode]
              ) -> list[tuple[TreeNode, int, JointPlan | None]]:
        """Encode targets ``(node, first position)`` with every match its own node: ``(node, first position,
        plan)``. ``cut(node, n)`` splits ``node`` after ``n`` tokens and returns the head (the tail stays ``node``)."""
        out: list[tuple[TreeNode, int, JointPlan | None]] = []
        for node, lo in targets:
            done, total = 0, len(node.key)  # tokens of the original node already cut off, and all of them
            for start, length, plan in self.matches(node):
                if start > done:
                    out.append((cut(node, start - done), lo + done, None))
                head = cut(node, length) if start + length < total else node
                out.append((head, lo + start, plan))
                done = start + length
                if head is node:
                    break
            else:
                out.append((node, lo + done, None))
        return out
