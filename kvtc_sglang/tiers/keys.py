"""Content-addressed, deterministic L3 object keys: one key per full chunk of tokens, a SHA-256 hash chain.

Token sequences are cut into chunks of ``chunk_tokens`` tokens aligned to positions (chunk ``i`` holds
positions ``[i*C, (i+1)*C)``); only full chunks get keys. Chunk ``i``'s chain hash is
``sha256(prev_digest || uint32-LE token ids of chunk i)`` where ``prev_digest`` is the 32-byte digest of chunk
``i-1`` (nothing for chunk 0 unless a seed is given): the same chain as SGLang's
``sglang.srt.mem_cache.utils.get_hash_str`` (its native ``hash_page`` for token ids below 2**32), written here
without importing SGLang. So a key names its whole prefix: changing an early token changes every later key.

The key is ``kvtc-{digest}-{chain hash}``; ``digest`` (``scheme_digest``) names everything that must match for
an object to be usable (calibration artifact, model, KV dtype, tensor-parallel size and rank, chunk size,
codec), so a mismatch is a miss, never a collision (as SGLang's unified key scheme does with its namespace
digest). Tenant isolation: seed chain 0 with ``namespace_seed(extra_key, cache_salt)`` (SGLang's
``storage_namespace_seed``, same bytes) and requests with different salts never share keys.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

KEY_PREFIX = "kvtc"
DIGEST_CHARS = 16
_HEX_DIGEST = re.compile(r"^[0-9a-f]{8,64}$")
_HEX_CHAIN = re.compile(r"^[0-9a-f]{64}$")
_SCHEME_TAG = b"kvtc-l3-scheme-v1"
_MAX_TOKEN = 0xFFFFFFFF


@dataclass(frozen=True)
class KeyScheme:
    """How a deployment names its L3 objects: chunk size in tokens and the identity digest (``scheme_digest``)."""

    chunk_tokens: int
    digest: str

    def __post_init__(self) -> None:
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens: expected an int >= 1, got {self.chunk_tokens!r}")
        if not isinstance(self.digest, str) or not _HEX_DIGEST.match(self.digest):
            raise ValueError(f"digest: expected 8 to 64 lowercase hex characters, got {self.digest!r}")


def _field(h: hashlib._Hash, value: bytes) -> None:
    h.update(len(value).to_bytes(8, "little") + value)


def scheme_digest(artifact_id: bytes | str, *, model: str, kv_dtype: str, tp_size: int, tp_rank: int,
                  chunk_tokens: int, codec: str) -> str:  # fmt: skip
    """Short hex digest (16 characters) of everything two replicas must share to exchange L3 objects
    (keyword arguments: a swapped ``tp_size``/``tp_rank`` must not pass silently).

    Each field is length-prefixed, so no two different field tuples encode to the same bytes."""
    if isinstance(artifact_id, str):
        artifact_id = artifact_id.encode("utf-8")
    if not isinstance(artifact_id, bytes) or not artifact_id:
        raise ValueError(f"artifact_id: expected non-empty bytes or str, got {artifact_id!r}")
    for name, text in (("model", model), ("kv_dtype", kv_dtype), ("codec", codec)):
        if not isinstance(text, str) or not text:
            raise ValueError(f"{name}: expected a non-empty str, got {text!r}")
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size: expected an int >= 1, got {tp_size!r}")
    if not isinstance(tp_rank, int) or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank: expected an int in [0, {tp_size}), got {tp_rank!r}")
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected an int >= 1, got {chunk_tokens!r}")
    h = hashlib.sha256(_SCHEME_TAG)
    _field(h, artifact_id)
    for text in (model, kv_dtype, codec):
        _field(h, text.encode("utf-8"))
    for number in (tp_size, tp_rank, chunk_tokens):
        _field(h, number.to_bytes(8, "little"))
    return h.hexdigest()[:DIGEST_CHARS]


def namespace_seed(extra_key: str | None, cache_salt: str | None) -> str | None:
    """The chain seed of one tenant namespace (SGLang's ``storage_namespace_seed``, byte for byte): pass it as
    ``prev_hash`` of chunk 0. ``None`` when neither is set (the unnamespaced chain)."""
    if extra_key is None and cache_salt is None:
        return None
    h = hashlib.sha256(b"sglang-cache-namespace-v1")
    for part in (extra_key, cache_salt):
        if part is None:
            h.update(b"\x00")
            continue
        encoded = part.encode("utf-8")
        h.update(b"\x01" + len(encoded).to_bytes(8, "little") + encoded)
    return h.hexdigest()


def _token_bytes(tokens: Sequence[int] | np.ndarray, lo: int, hi: int) -> bytes:
    """Tokens ``[lo, hi)`` as uint32 little-endian bytes (one vectorized conversion, no per-token loop)."""
    arr = np.asarray(tokens[lo:hi])
    if arr.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D sequence of ints, got shape {arr.shape}")
    if arr.size == 0:
        return b""
    if arr.dtype.kind not in "iu":
        raise ValueError(f"tokens: expected integer token ids, got dtype {arr.dtype}")
    lo_id, hi_id = int(arr.min()), int(arr.max())
    if lo_id < 0 or hi_id > _MAX_TOKEN:
        raise ValueError(f"tokens: expected ids in [0, 2**32), got min {lo_id}, max {hi_id}")
    return arr.astype("<u4", copy=False).tobytes()


def chain_hashes(tokens: Sequence[int] | np.ndarray, chunk_tokens: int, start_chunk: int = 0,
                 prev_hash: str | None = None) -> list[str]:  # fmt: skip
    """The chain hash (64 hex characters) of every full chunk from ``start_chunk`` on.

    ``tokens`` is the whole sequence from position 0; ``prev_hash`` is the chain hash of chunk
    ``start_chunk - 1`` (required when ``start_chunk > 0``) or, for chunk 0, an optional namespace seed."""
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens: expected an int >= 1, got {chunk_tokens!r}")
    full = len(tokens) // chunk_tokens
    if isinstance(start_chunk, bool) or not isinstance(start_chunk, int) or not 0 <= start_chunk <= full:
        raise ValueError(f"start_chunk: expected an int in [0, {full}] ({len(tokens)} tokens), got {start_chunk!r}")
    if prev_hash is None and start_chunk > 0:
        raise ValueError(f"prev_hash: chunk {start_chunk} continues a chain, expected chunk {start_chunk - 1}'s hash")
    if prev_hash is not None and (not isinstance(prev_hash, str) or not _HEX_CHAIN.match(prev_hash)):
        raise ValueError(f"prev_hash: expected 64 lowercase hex characters, got {prev_hash!r}")
    data = memoryview(_token_bytes(tokens, start_chunk * chunk_tokens, full * chunk_tokens))
    prev = bytes.fromhex(prev_hash) if prev_hash is not None else b""
    step = 4 * chunk_tokens
    out = []
    for i in range(full - start_chunk):
        h = hashlib.sha256(prev)
        h.update(data[i * step : (i + 1) * step])
        prev = h.digest()
        out.append(prev.hex())
    return out


def object_key(scheme: KeyScheme, chain_hash: str) -> str:
    """The L3 object key of one chunk: ``kvtc-{digest}-{chain hash}``."""
    return f"{KEY_PREFIX}-{scheme.digest}-{chain_hash}"


def key_chain_hash(key: str) -> str:
    """The chain hash inside an object key (to continue a chain with ``prev_hash``)."""
    parts = key.split("-") if isinstance(key, str) else []
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not _HEX_CHAIN.match(parts[2]):
        raise ValueError(f"key: expected '{KEY_PREFIX}-<digest>-<64 hex>', got {key!r}")
    return parts[2]


def chunk_keys(tokens: Sequence[int] | np.ndarray, scheme: KeyScheme, start_chunk: int = 0,
               prev_hash: str | None = None) -> list[str]:  # fmt: skip
    """The object key of every full chunk of ``tokens`` from ``start_chunk`` on (a partial last chunk has none).

    ``tokens``: the whole sequence from position 0 (list, array or ``np.ndarray`` of ids in ``[0, 2**32)``);
    ``prev_hash``: ``key_chain_hash`` of chunk ``start_chunk - 1``'s key, or a ``namespace_seed`` for chunk 0."""
    if not isinstance(scheme, KeyScheme):
        raise ValueError(f"scheme: expected a KeyScheme, got {type(scheme).__name__}")
    return [object_key(scheme, h) for h in chain_hashes(tokens, scheme.chunk_tokens, start_chunk, prev_hash)]
