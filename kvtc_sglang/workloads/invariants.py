"""Accounting checks over a live radix cache and its allocator (used by tests and the soak run)."""

from __future__ import annotations

import torch

from ..cache.tree_walk import subtree_postorder


def _free_slots(allocator) -> torch.Tensor:
    free = allocator.get_all_free_pages()  # page ids ([num_free_pages]); token ids when page_size == 1
    ps = allocator.page_size
    if ps == 1:
        return free
    return (free[:, None] * ps + torch.arange(ps, device=free.device)).reshape(-1)  # [num_free_pages * P]


def check_invariants(cache, held_slots: int = 0) -> dict:
    """Raise ``RuntimeError`` naming the first broken invariant; returns the census on success.

    Checks: no slot is both free and used, or used twice; free + tree + compressed store + held = pool;
    ``evictable_size``/``protected_size`` match the locked state of device nodes; compressed nodes (KVTC
    only) are unlocked, have unlocked subtrees and never start inside the attention sinks.
    """
    allocator = cache.token_to_kv_pool_allocator
    nodes = [(n, s) for n, s in subtree_postorder(cache.root_node) if n is not cache.root_node]
    device = [n for n, _ in nodes if n.value is not None]
    used = [n.value for n in device]
    store = getattr(cache, "store", None)
    if store is not None:
        used.append(store.held_slots())
    used_slots = torch.cat(used) if used else torch.empty(0, dtype=torch.int64)
    if used_slots.unique().numel() != used_slots.numel():
        raise RuntimeError(f"a slot is used twice: {used_slots.numel() - used_slots.unique().numel()} duplicates")
    free = _free_slots(allocator)
    if free.unique().numel() != free.numel():
        raise RuntimeError(f"double free: {free.numel() - free.unique().numel()} slots are free twice")
    both = torch.isin(used_slots, free.to(used_slots.device))
    if bool(both.any()):
        raise RuntimeError(f"{int(both.sum())} slots are both free and in use")
    total = allocator.available_size() + used_slots.numel() + held_slots
    if total != allocator.size:
        raise RuntimeError(
            f"slots do not add up: free {allocator.available_size()} + used {used_slots.numel()} + held "
            f"{held_slots} = {total}, pool has {allocator.size}"
        )
    evictable = sum(len(n.value) for n in device if n.lock_ref == 0)
    protected = sum(len(n.value) for n in device if n.lock_ref > 0)
    if (cache.evictable_size_, cache.protected_size_) != (evictable, protected):
        raise RuntimeError(
            f"evictable/protected sizes are {cache.evictable_size_}/{cache.protected_size_}, "
            f"tree holds {evictable}/{protected}"
        )
    io = getattr(cache, "io", None)
    compressed = io.entries if io is not None else {}
    if io is not None:
        for node in io.retained:
            if node.value is None or node.parent is None or node in compressed:
                raise RuntimeError("a node with a kept blob is not a device node in the tree")
        wanted = cache.wanted_slots()
        if not 0 <= wanted <= store.num_slots:
            raise RuntimeError(f"{wanted} wanted store slots, the store holds {store.num_slots}")
        if cache.evictable_size() != cache.evictable_size_ + store.num_slots - wanted:
            raise RuntimeError("evictable_size() must count the store's borrowed slots that are not wanted")
        if cache.protected_size() != cache.protected_size_ + wanted:
            raise RuntimeError("protected_size() must count the locked tokens and the wanted store slots")
    ps = cache.page_size
    sink_end = -(-cache.config.sink_tokens // ps) * ps if compressed else 0
    for node, entry in compressed.items():
        if node.value is not None or node.parent is None:
            raise RuntimeError("a compressed node still holds slots or is detached from the tree")
        if any(n.lock_ref > 0 for n, _ in subtree_postorder(node)):
            raise RuntimeError("a compressed node or one below it is locked")
        if entry.start + entry.skip < sink_end:
            raise RuntimeError(f"a compressed node starts at {entry.start}, inside the {sink_end} sink tokens")
    return {
        "free": allocator.available_size(),
        "device_tokens": sum(len(n.value) for n in device),
        "compressed_tokens": sum(e.node_tokens for e in compressed.values()),
        "nodes": len(nodes),
    }
