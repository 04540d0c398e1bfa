"""CRC-32 of many byte chunks on the chunks' own device, bit-identical to ``zlib.crc32``.

A blob's chunk CRCs are checked where the blob lives: on a GPU, the bytes never cross to the host; only
the ``[C]`` CRC values do, in one small copy at the end.

Method (zlib's CRC-32: reflected polynomial ``0xEDB88320``, initial value and final XOR ``0xFFFFFFFF``).
Let ``R(m)`` be the *raw* CRC (zero initial value, no final XOR). ``R`` is linear over GF(2), leading zero
bytes leave it at 0, and ``R(a || b) = shift(R(a), len(b)) ^ R(b)``, where ``shift(r, n)`` multiplies the
remainder by ``x^(8n)`` modulo the polynomial, a linear map of 32 bits applied with four byte tables.
``zlib.crc32(m) = R(m) ^ zlib.crc32(bytes(len(m)))``, and the second term depends on the length only.

So the bytes are cut into 16-byte words (one gather from a ``[16, 256]`` table and an XOR tree per word)
and the word CRCs are merged pairwise, ``log2`` levels, all chunks at once (see :func:`raw_crc_torch`):
about a hundred small vectorised torch ops per batch whatever the number of chunks, no Python loop over
bytes. On the CPU zlib is far faster (see ``benchmarks/crc_bench.py``), so CPU tensors go to zlib.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from functools import lru_cache

import torch

POLY = 0xEDB88320  # CRC-32 polynomial, reflected (bit 31 is x^0)
_ONE = 1 << 31  # the polynomial 1 in the reflected representation
_WORD = 16  # bytes per leaf word
_MAX_LEVELS = 40  # merge levels with tables: chunks up to _WORD * 2**39 bytes
_BLOCK_LEVELS = 8  # first stage: blocks of at most _WORD * 2**8 = 4 KiB
METHODS = ("auto", "zlib", "torch")


def _mulmod(a: int, b: int) -> int:
    """``a * b`` modulo the CRC polynomial, both 32-bit reflected remainders (zlib's ``multmodp``)."""
    p = 0
    for i in range(32):
        if a & (_ONE >> i):
            p ^= b
        b = (b >> 1) ^ POLY if b & 1 else b >> 1
    return p


@lru_cache(maxsize=256)
def _x8pow(nbytes: int) -> int:
    """``x^(8 * nbytes)`` modulo the polynomial."""
    out, base, e = _ONE, _ONE >> 8, nbytes  # base = x^8
    while e:
        if e & 1:
            out = _mulmod(out, base)
        base = _mulmod(base, base)
        e >>= 1
    return out


def shift(remainder: int, nbytes: int) -> int:
    """The raw CRC register ``remainder`` advanced over ``nbytes`` zero bytes."""
    return _mulmod(_x8pow(nbytes), remainder)


@lru_cache(maxsize=4096)
def zeros_crc(nbytes: int) -> int:
    """``zlib.crc32(bytes(nbytes))`` in ``O(log nbytes)``: what the initial value and final XOR add."""
    return shift(0xFFFFFFFF, nbytes) ^ 0xFFFFFFFF


def _span(basis: list[int]) -> list[int]:
    """All ``2**len(basis)`` XOR combinations: ``out[b] = XOR of basis[i] for the set bits i of b``."""
    out = [0] * (1 << len(basis))
    for b in range(1, len(out)):
        low = (b & -b).bit_length() - 1
        out[b] = out[b & (b - 1)] ^ basis[low]
    return out


def _byte_crc(b: int) -> int:
    """Raw CRC of the single byte ``b`` (zlib's table entry)."""
    for _ in range(8):
        b = (b >> 1) ^ POLY if b & 1 else b >> 1
    return b


def _signed(values: list[int]) -> list[int]:
    """uint32 values as int32 bit patterns (torch has int32 bitwise ops, not full uint32 ones)."""
    return [v - (1 << 32) if v >= 1 << 31 else v for v in values]


@lru_cache(maxsize=1)
def _host_tables() -> tuple[list[int], list[int]]:
    """``(leaf [_WORD * 256], merge [_MAX_LEVELS * 4 * 256])`` as int32 bit patterns.

    ``leaf[j * 256 + b] = shift(R(b), _WORD - 1 - j)``: byte ``j`` of a word. ``merge[(l * 4 + k) * 256 + b]
    = shift(b << 8k, _WORD * 2**l)``: byte ``k`` of a left-half CRC at merge level ``l``.
    """
    leaf: list[int] = []
    for j in range(_WORD):
        leaf += _span([shift(_byte_crc(1 << i), _WORD - 1 - j) for i in range(8)])
    merge: list[int] = []
    for level in range(_MAX_LEVELS):
        nbytes = _WORD << level
        for k in range(4):
            merge += _span([shift(1 << (8 * k + i), nbytes) for i in range(8)])
    return _signed(leaf), _signed(merge)


_DEVICE_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if device not in _DEVICE_TABLES:
        leaf, merge = _host_tables()
        _DEVICE_TABLES[device] = (
            torch.tensor(leaf, dtype=torch.int32, device=device),
            torch.tensor(merge, dtype=torch.int32, device=device).view(_MAX_LEVELS, 4 * 256),
        )
    return _DEVICE_TABLES[device]


def _take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a 1-D table (``index_select`` on the flat index: much faster than ``[]`` on CPU)."""
    return table.index_select(0, index.reshape(-1)).view(index.shape)


def _merge(v: torch.Tensor, merge: torch.Tensor, level: int) -> torch.Tensor:
    """Merge the ``[rows, n]`` raw CRCs of consecutive ``_WORD * 2**level``-byte blocks pairwise until one is left.

    An odd count gets a leading zero block (leading zero bytes leave a raw CRC unchanged). The left CRC of
    each pair is shifted by one gather of its four bytes from ``merge[level]`` (``[4 * 256]`` int32).
    """
    byte_offsets = torch.arange(4, dtype=torch.int64, device=v.device) * 256
    while v.shape[1] > 1:
        if v.shape[1] % 2:
            v = torch.nn.functional.pad(v, (1, 0))
        pairs = v.view(v.shape[0], -1, 2)
        left = pairs[..., 0].clone(memory_format=torch.contiguous_format)  # strides (n/2, 1), even when n/2 == 1
        left_bytes = left.view(torch.uint8).view(v.shape[0], -1, 4)  # little endian: byte k = bits 8k..8k+7
        shifted = _take(merge[level], left_bytes.long() + byte_offsets)  # [rows, n/2, 4]: shift of each byte
        v = shifted[..., 0] ^ shifted[..., 1] ^ shifted[..., 2] ^ shifted[..., 3] ^ pairs[..., 1]
        level += 1
    return v[:, 0]


def _right_align(flat: torch.Tensor, lengths: list[int], width: torch.Tensor | int, rows_total: int) -> torch.Tensor:
    """Scatter ``flat`` (the concatenated rows of ``lengths``) into zeros, each row right-aligned in its span.

    ``width`` is each row's span (``[C]`` int64 on the device, or one int); returns ``[rows_total]``.
    """
    device = flat.device
    out = torch.zeros(rows_total, dtype=flat.dtype, device=device)
    total = flat.numel()
    if total == 0:
        return out
    lens = torch.tensor(lengths, dtype=torch.int64, device=device)
    spans = width if isinstance(width, torch.Tensor) else torch.full_like(lens, width)
    row = torch.repeat_interleave(torch.arange(len(lengths), device=device), lens, output_size=total)
    src_start = torch.cumsum(lens, 0) - lens
    dst_end = torch.cumsum(spans, 0)
    out[torch.arange(total, device=device) + _take(dst_end - lens - src_start, row)] = flat
    return out


def raw_crc_torch(chunks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Raw CRCs (zero initial value, no final XOR) of ``C`` chunks ``[n_i] uint8`` on their device.

    Two stages, so that chunks of very different sizes waste little padding: each chunk is left-padded
    to whole blocks of ``B = _WORD * 2**a`` bytes and all blocks of all chunks are reduced together
    (``[blocks, B]`` bytes -> ``[blocks]`` CRCs); then each chunk's block CRCs, right-aligned in a
    ``[C, max blocks]`` int32 grid, are merged. Returns ``[C]`` int32 (uint32 bit patterns) on the
    chunks' device, with no host synchronisation.
    """
    device = chunks[0].device
    lengths = [int(c.numel()) for c in chunks]
    longest = max(lengths)
    if longest > _WORD << (_MAX_LEVELS - 1):
        raise ValueError(f"chunk of {longest} bytes, the torch CRC handles at most {_WORD << (_MAX_LEVELS - 1)}")
    a = min(_BLOCK_LEVELS, max(0, (-(-longest // _WORD) - 1).bit_length()))
    block = _WORD << a
    blocks = [max(1, -(-n // block)) for n in lengths]  # blocks per chunk
    nblocks = sum(blocks)
    flat = torch.cat([c.reshape(-1) for c in chunks]) if sum(lengths) else chunks[0].new_empty(0)
    blocks_t = torch.tensor(blocks, dtype=torch.int64, device=device)
    padded = _right_align(flat, lengths, blocks_t * block, nblocks * block)  # [nblocks * B] uint8
    leaf, merge = _tables(device)
    offsets = torch.arange(_WORD, dtype=torch.int64, device=device) * 256
    v = _take(leaf, padded.view(nblocks, block // _WORD, _WORD).long() + offsets)  # [nblocks, B/16, 16] int32
    w = _WORD
    while w > 1:
        w //= 2
        v = v[..., :w] ^ v[..., w:]
    per_block = _merge(v[..., 0], merge, 0)  # [nblocks]: raw CRC of each block
    widest = max(blocks)
    grid = _right_align(per_block, blocks, widest, len(chunks) * widest).view(len(chunks), widest)
    return _merge(grid, merge, a)


def crc32_many(chunks: Sequence[torch.Tensor], method: str = "auto") -> list[int]:
    """``zlib.crc32`` of each ``[n_i] uint8`` chunk, all on one device.

    Args:
        chunks: 1-D uint8 tensors (contiguous or not), all on the same device.
        method: ``"auto"`` (zlib for CPU tensors, torch ops on any other device), ``"zlib"`` or ``"torch"``.

    Returns:
        ``C`` ints in ``[0, 2**32)``. The torch path copies only these ``C`` values to the host.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not chunks:
        return []
    device = chunks[0].device
    for c in chunks:
        if c.dtype != torch.uint8 or c.dim() != 1:
            raise ValueError(f"CRC chunks must be 1-D uint8 tensors, got {c.dtype} with shape {list(c.shape)}")
        if c.device != device:
            raise ValueError(f"CRC chunks must share one device: {device} and {c.device}")
    if method == "zlib" or (method == "auto" and device.type == "cpu"):
        return [zlib.crc32(c.detach().cpu().contiguous().numpy().data) for c in chunks]
    raw = raw_crc_torch(chunks).tolist()  # the one device-to-host copy: [C] values
    return [(r & 0xFFFFFFFF) ^ zeros_crc(int(c.numel())) for r, c in zip(raw, chunks, strict=True)]


def crc32(chunk: torch.Tensor, method: str = "auto") -> int:
    """``zlib.crc32`` of one ``[n] uint8`` tensor (see :func:`crc32_many`)."""
    return crc32_many([chunk], method)[0]
