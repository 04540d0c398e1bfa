"""What one L3 object holds and which tree nodes it is made of: pure functions over the payload bytes and the
radix path (no I/O, no codec calls).

An object is one chunk ``[jC, (j+1)C)`` of one radix path, as consecutive *segments*: ``kvtc`` segments are
the blobs of compressed or encoded nodes (each covers exactly its node), ``raw`` segments the rows of short
device nodes that are never encoded on their own (the sinks, a chat template's shared head: at most
``RAW_LIMIT`` tokens each), coded by :class:`~kvtc_sglang.codec.RawCodec`, ``joint`` segments the residual blobs
of joint encoding, each naming its reference blob, which is an object of its own (:class:`RefName`,
:mod:`~kvtc_sglang.cache.l3_joint`). Payload layout (little-endian):
``magic "KVS1" | count u16`` then per segment ``kind u8 | lo u32 | hi u32 | nbytes u32 | bytes``; a joint
segment's bytes are ``key_len u16 | key | ref_start u32 | ref_tokens u32 | ref_lo u32 | ref_hi u32 | blob``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .tree_walk import TreeNode

RAW, KVTC, JOINT = 0, 1, 2
RAW_LIMIT = 64  # most tokens of a device node an object carries raw (~23 KB/token for SmolLM2)
_HEAD = struct.Struct("<4sH")
_SEG = struct.Struct("<BIII")
_MAGIC = b"KVS1"
_REF = struct.Struct("<IIII")


@dataclass(frozen=True)
class Segment:
    """Positions ``[lo, hi)`` of a chunk: ``kind`` RAW or KVTC, ``data`` the blob's bytes."""

    kind: int
    lo: int
    hi: int
    data: bytes


@dataclass(frozen=True)
class RefName:
    """The reference a joint segment's residual decodes against: its object ``key``, its first position
    ``start`` and ``num_tokens``, and the span ``[lo, hi)`` of it the residual codes."""

    key: str
    start: int
    num_tokens: int
    lo: int
    hi: int


def pack_joint(name: RefName, blob: bytes) -> bytes:
    key = name.key.encode()
    return struct.pack("<H", len(key)) + key + _REF.pack(name.start, name.num_tokens, name.lo, name.hi) + blob


def unpack_joint(data: bytes) -> tuple[RefName, bytes]:
    """``(reference name, residual blob bytes)`` of a joint segment's bytes; ``ValueError`` when malformed."""
    if len(data) < 2:
        raise ValueError(f"joint segment of {len(data)} bytes, expected at least 2")
    (n,) = struct.unpack_from("<H", data)
    if len(data) < 2 + n + _REF.size:
        raise ValueError(f"joint segment of {len(data)} bytes, its key of {n} bytes needs {2 + n + _REF.size}")
    try:
        key = data[2 : 2 + n].decode("ascii")
    except UnicodeDecodeError as e:
        raise ValueError(f"joint segment's reference key is not ASCII: {e}") from e
    start, num, lo, hi = _REF.unpack_from(data, 2 + n)
    if not 0 <= lo < hi <= num:
        raise ValueError(f"joint segment's span [{lo}, {hi}) is not inside its reference's {num} tokens")
    return RefName(key, start, num, lo, hi), data[2 + n + _REF.size :]


def pack_segments(segments: list[Segment]) -> bytes:
    parts = [_HEAD.pack(_MAGIC, len(segments))]
    for s in segments:
        parts += [_SEG.pack(s.kind, s.lo, s.hi, len(s.data)), s.data]
    return b"".join(parts)


def unpack_segments(data: bytes, lo: int, hi: int) -> list[Segment]:
    """The segments of a payload that must cover ``[lo, hi)`` exactly, in order; ``ValueError`` otherwise."""
    if len(data) < _HEAD.size:
        raise ValueError(f"L3 payload of {len(data)} bytes, expected at least {_HEAD.size}")
    magic, count = _HEAD.unpack_from(data)
    if magic != _MAGIC:
        raise ValueError(f"L3 payload magic {magic!r}, expected {_MAGIC!r}")
    out, at, pos = [], _HEAD.size, lo
    for i in range(count):
        if at + _SEG.size > len(data):
            raise ValueError(f"L3 payload truncated in segment {i} of {count}")
        kind, s_lo, s_hi, n = _SEG.unpack_from(data, at)
        at += _SEG.size
        if kind not in (RAW, KVTC, JOINT) or s_lo != pos or not s_lo < s_hi <= hi or at + n > len(data):
            raise ValueError(f"L3 segment {i}: kind {kind}, [{s_lo}, {s_hi}) of {n} bytes; expected to start at "
                             f"{pos}, end by {hi}, within {len(data) - at} bytes")  # fmt: skip
        out.append(Segment(kind, s_lo, s_hi, data[at : at + n]))
        at, pos = at + n, s_hi
    if pos != hi or at != len(data):
        raise ValueError(f"L3 segments cover [{lo}, {pos}) of [{lo}, {hi}) with {len(data) - at} bytes left over")
    return out


def path_of(node: TreeNode) -> list[tuple[TreeNode, int, int]]:
    """``(node, first position, end position)`` from the root's child down to ``node``."""
    path = []
    up = node
    while up is not None and up.parent is not None:
        path.append(up)
        up = up.parent
    out, depth = [], 0
    for n in reversed(path):
        out.append((n, depth, depth + len(n.key)))
        depth += len(n.key)
    return out


def path_tokens(node: TreeNode) -> tuple[np.ndarray, Any]:
    """``(token ids from position 0 to the end of node [depth] int64, the root child's RadixKey)``."""
    path = path_of(node)
    parts = [np.asarray(n.key.token_ids[: len(n.key)], dtype=np.int64) for n, _, _ in path]
    return (np.concatenate(parts) if parts else np.zeros(0, np.int64)), (path[0][0].key if path else node.key)


def chunk_ends(node: TreeNode, node_end: int, chunk_end: int, limit: int = 8) -> list[TreeNode]:
    """Nodes at or below ``node`` (which ends at ``node_end``) that end exactly at ``chunk_end``: the paths a
    chunk of ``node`` takes (one per branch inside the chunk, at most ``limit``)."""
    out: list[TreeNode] = []
    stack = [(node, node_end)]
    while stack and len(out) < limit:
        n, end = stack.pop()
        if end == chunk_end:
            out.append(n)
        elif end < chunk_end:
            stack.extend((c, end + len(c.key)) for c in n.children.values())
    return out


def chunk_layout(end_node: TreeNode, lo: int, hi: int, blob_of: Any) -> list[tuple[int, int, int, Any]] | None:
    """How the chunk ``[lo, hi)`` of ``end_node``'s path (which ends at ``hi``) is made:
    ``(kind, seg_lo, seg_hi, what)`` with ``what`` the node's blob entry (KVTC; JOINT for a residual blob) or its
    slots for the segment (RAW);
    ``None`` when it cannot be made now (a long device part not encoded yet, a blob covering more than its node).
    ``blob_of(node)``: the node's blob entry (compressed or kept), or ``None``."""
    out: list[tuple[int, int, int, Any]] = []
    for n, start, end in path_of(end_node):
        if end <= lo:
            continue
        s_lo, s_hi = max(start, lo), min(end, hi)
        entry = blob_of(n)
        if entry is not None and entry.skip == 0 and entry.start == start and end <= hi and start >= lo:
            out.append((JOINT if entry.joint is not None else KVTC, s_lo, s_hi, entry))
        elif n.value is not None and s_hi - s_lo <= RAW_LIMIT:
            out.append((RAW, s_lo, s_hi, n.value[s_lo - start : s_hi - start]))
        else:
            return None
    return out if out and out[0][1] == lo and out[-1][2] == hi else None
