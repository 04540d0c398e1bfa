"""Grafting chunks fetched from the L3 into the radix tree (:mod:`~kvtc_sglang.cache.l3_tier` calls it at a
scheduler tick, outside free groups): kvtc segments become compressed nodes whose blobs are in host memory, raw
segments (the sinks, a chat template's shared head) device nodes on fresh slots. Functions over the tree, kept out
of the cache's parts: they call the parts' public methods (``surgery``, ``restorer``, ``eviction``) and read
``guards.protect`` and ``clock.ticks``."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import torch
from sglang.srt.mem_cache.radix_cache import RadixKey, TreeNode

from ..codec import BlobError
from .l3_objects import JOINT, RAW
from .policy import node_start

logger = logging.getLogger(__name__)


def graft_chunks(tree: Any, key: RadixKey, items: list[tuple], raw_codec: Any, charges: list[tuple[int, int]], *,
                 link: Any = None) -> tuple[int, int]:  # fmt: skip
    """Hang consecutive segments (``(kind, lo, hi, blob [n] uint8 CPU, header)``; a joint segment's ``+ (RefName,)``)
    under ``key``'s path of ``tree`` (a :class:`~kvtc_sglang.cache.radix.KVTCRadixCache`), a blob charged
    ``charges[i][0]`` host bytes (the ranks' agreed size) and a joint segment's reference, if it is adopted,
    ``charges[i][1]``; ``link(parent, name, charge)`` gives a joint segment's ``JointLink`` (``None``: no room).
    Segments the tree already covers are skipped (one the match ends inside keeps its blob for the tail:
    ``skip``). Returns ``(nodes, tokens)`` grafted."""
    key = key.page_aligned(tree.page_size)
    device_len, _, host_len, node = tree.surgery.match(key)
    m = device_len + host_len
    if node is not tree.root_node and node_start(node) + len(node.key) != m:
        return 0, 0  # the match ends inside a compressed node
    count = tokens = 0
    for (kind, lo, hi, blob, header, *name), (charge, ref_charge) in zip(items, charges, strict=True):
        if hi <= m:
            continue
        if lo > m:
            break
        span = (lo, m, hi)
        joint = link(node, name[0], ref_charge) if kind == JOINT else None
        if kind == JOINT and joint is None:
            break
        child = _rows(tree, node, key[m:hi], span, (blob, header, raw_codec)) if kind == RAW else (
            _blob(tree, node, key[m:hi], span, (blob, header, charge), joint=joint))  # fmt: skip
        if child is None:
            break
        count, tokens = count + 1, tokens + hi - m
        node, m = child, hi
    return count, tokens


def _blob(tree: Any, node: TreeNode, key: RadixKey, span: tuple[int, int, int], blob: tuple, *, joint: Any = None
          ) -> TreeNode | None:
    """A kvtc blob of positions ``[lo, hi)`` as a compressed node for ``key`` = ``[m, hi)`` (a residual blob:
    ``joint`` its ``JointLink``)."""
    (lo, m, hi), (data, header, charge) = span, blob
    handle = tree.placement.admit(data, node, tree.guards.protect, tree.eviction.drop_subtree, charge=charge)
    if handle is None:
        return None
    child = _node(tree, node, key, None)
    tree.io.add(child, replace(tree.io.make_entry(handle, lo, hi - lo, header, joint=joint), skip=m - lo))
    tree.wanted.mark(child, tree.clock.ticks)
    return child


def _rows(tree: Any, node: TreeNode, key: RadixKey, span: tuple[int, int, int], raw: tuple) -> TreeNode | None:
    """Raw rows ``[lo, hi)`` into fresh slots (the part below ``m`` given back) as a device node for ``key``."""
    (lo, m, hi), (data, header, raw_codec) = span, raw
    slots = tree.restorer.alloc_slots(hi - lo)
    if slots is None:
        return None
    try:
        tree.ctl.restore(lambda: [data], [header], [(slots, torch.arange(lo, hi))], codec=raw_codec)
    except (BlobError, RuntimeError, ValueError) as e:
        tree.stats.l3_rejected += 1
        logger.warning("kvtc: L3 raw rows refused (%s): a miss", e)
        tree.surgery.free_slots(slots)
        return None
    if m > lo:
        tree.surgery.free_slots(slots[: m - lo])  # already in the tree
    child = _node(tree, node, key, slots[m - lo :])
    tree.evictable_size_ += hi - m
    tree.policy.candidates.add(child)
    return child


def _node(tree: Any, parent: TreeNode, key: RadixKey, value: torch.Tensor | None) -> TreeNode:
    child = TreeNode(priority=parent.priority)
    child.parent, child.key, child.value = parent, key, value
    parent.children[key.child_key(tree.page_size)] = child
    tree.kv_events.record_store(child)
    tree._update_leaf_status(parent)
    tree._update_leaf_status(child)
    return child
