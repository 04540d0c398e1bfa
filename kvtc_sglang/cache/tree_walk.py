"""Pure tree walks over SGLang ``TreeNode`` objects (no cache state): orders and compression candidates."""

from __future__ import annotations

from typing import Any

TreeNode = Any  # sglang.srt.mem_cache.radix_cache.TreeNode; duck-typed (children, key, value, lock_ref)


def subtree_postorder(node: TreeNode) -> list[tuple[TreeNode, int]]:
    """Every node under ``node`` (itself included), children before parents, with its start depth
    relative to ``node``'s start."""
    order: list[tuple[TreeNode, int]] = []
    stack = [(node, 0)]
    while stack:
        n, start = stack.pop()
        order.append((n, start))
        end = start + len(n.key)
        stack.extend((c, end) for c in n.children.values())
    order.reverse()
    return order


def device_values(root: TreeNode) -> list[Any]:
    """The slot tensors of every device node under ``root`` (itself excluded), in no particular order."""
    out, stack = [], list(root.children.values())
    while stack:
        n = stack.pop()
        if n.value is not None:
            out.append(n.value)
        stack.extend(n.children.values())
    return out


def compress_candidates(
    root: TreeNode, sink_end: int, window: int, page_size: int, min_tokens: int
) -> list[tuple[TreeNode, int, int, int]]:
    """Device, unlocked nodes with a compressible span, least recently used first.

    A node ``[start, end)`` may compress ``[lo, hi)`` with ``lo = max(start, sink_end)`` and
    ``hi = min(end, floor_page(min_leaf_end - window))``, where ``min_leaf_end`` is the end depth of the
    shallowest leaf under it (each cached sequence keeps its last ``window`` tokens uncompressed).
    Returns ``(node, start, lo, hi)`` with ``hi - lo >= min_tokens``.
    """
    order = subtree_postorder(root)
    min_leaf_end: dict[int, int] = {}
    out = []
    for n, start in order:  # children first
        end = start + len(n.key)
        mle = min((min_leaf_end[id(c)] for c in n.children.values()), default=end)
        min_leaf_end[id(n)] = mle
        if n is root or n.value is None or n.lock_ref > 0:
            continue
        lo = max(start, sink_end)
        hi = min(end, (mle - window) // page_size * page_size)
        if hi - lo >= min_tokens:
            out.append((n, start, lo, hi))
    out.sort(key=lambda c: c[0].last_access_time)
    return out
