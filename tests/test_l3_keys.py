"""L3 keys: deterministic, chained, scoped by the scheme digest, only full chunks, fast."""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pytest

from kvtc_sglang.tiers.keys import (
    KeyScheme,
    chunk_keys,
    key_chain_hash,
    namespace_seed,
    scheme_digest,
)

ARGS = dict(model="smollm2-135m", kv_dtype="bfloat16", tp_size=2, tp_rank=0, chunk_tokens=16, codec="kvtc-v1")


def digest(**over) -> str:
    return scheme_digest(over.pop("artifact_id", b"artifact-1"), **{**ARGS, **over})


SCHEME = KeyScheme(16, digest())


def tokens(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(0, 150_000, n)]


def reference_chain(toks: list[int], chunk: int, seed_hex: str | None = None) -> list[str]:
    """The chain written independently, token by token (SGLang's hash_page for uint32 ids)."""
    prev = bytes.fromhex(seed_hex) if seed_hex else b""
    out = []
    for i in range(len(toks) // chunk):
        page = b"".join(t.to_bytes(4, "little") for t in toks[i * chunk : (i + 1) * chunk])
        prev = hashlib.sha256(prev + page).digest()
        out.append(prev.hex())
    return out


@pytest.mark.parametrize("n", [0, 1, 7, 15, 16, 17, 97, 1000, 1029])
def test_full_chunks_only_and_reference_chain(n: int) -> None:
    toks = tokens(n)
    keys = chunk_keys(toks, SCHEME)
    assert len(keys) == n // 16
    assert [key_chain_hash(k) for k in keys] == reference_chain(toks, 16)
    assert all(k.startswith(f"kvtc-{SCHEME.digest}-") for k in keys)
    assert chunk_keys(np.asarray(toks, dtype=np.int64), SCHEME) == keys  # list and array agree
    assert chunk_keys(toks, SCHEME) == keys  # deterministic


def test_chain_property() -> None:
    toks = tokens(160)
    keys = chunk_keys(toks, SCHEME)
    for pos in (0, 17, 100):
        changed = list(toks)
        changed[pos] += 1
        other = chunk_keys(changed, SCHEME)
        first = pos // 16
        assert other[:first] == keys[:first]
        assert all(a != b for a, b in zip(other[first:], keys[first:], strict=True))
    # a trailing partial chunk never changes the full chunks' keys
    assert chunk_keys(toks + [5, 6, 7], SCHEME) == keys


def test_continuation_matches_one_pass() -> None:
    toks = tokens(200)
    keys = chunk_keys(toks, SCHEME)
    rest = chunk_keys(toks, SCHEME, start_chunk=5, prev_hash=key_chain_hash(keys[4]))
    assert rest == keys[5:]
    assert chunk_keys(toks, SCHEME, start_chunk=len(keys), prev_hash=key_chain_hash(keys[-1])) == []


def test_digest_scopes_keys() -> None:
    toks = tokens(64)
    base = chunk_keys(toks, SCHEME)
    variants = [digest(artifact_id=b"artifact-2"), digest(model="other"), digest(kv_dtype="float16"),
                digest(tp_size=4), digest(tp_rank=1), digest(chunk_tokens=32), digest(codec="kvtc-v2"),
                digest(artifact_id="artifact-1x")]  # fmt: skip
    assert len(set(variants)) == len(variants) and SCHEME.digest not in variants
    for d in variants:
        other = chunk_keys(toks, KeyScheme(16, d))
        assert not set(other) & set(base)  # a miss, never a collision
    assert digest() == SCHEME.digest and digest(artifact_id="artifact-1") == SCHEME.digest  # str == its UTF-8


def test_namespace_seed_isolates_tenants() -> None:
    toks = tokens(48)
    plain = chunk_keys(toks, SCHEME)
    a = chunk_keys(toks, SCHEME, prev_hash=namespace_seed(None, "tenant-a"))
    b = chunk_keys(toks, SCHEME, prev_hash=namespace_seed(None, "tenant-b"))
    assert not set(a) & set(b) and not set(a) & set(plain)
    assert namespace_seed(None, None) is None
    assert [key_chain_hash(k) for k in a] == reference_chain(toks, 16, namespace_seed(None, "tenant-a"))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: chunk_keys([1, -2] * 16, SCHEME), "min -2"),
        (lambda: chunk_keys([1, 2**32] * 16, SCHEME), "max 4294967296"),
        (lambda: chunk_keys([0.5] * 32, SCHEME), "dtype float"),
        (lambda: chunk_keys(tokens(32), SCHEME, start_chunk=1), "prev_hash"),
        (lambda: chunk_keys(tokens(32), SCHEME, start_chunk=3, prev_hash="0" * 64), r"\[0, 2\]"),
        (lambda: chunk_keys(tokens(32), SCHEME, prev_hash="xyz"), "64 lowercase hex"),
        (lambda: chunk_keys(np.zeros((2, 16), dtype=np.int64), SCHEME), "1-D"),
        (lambda: chunk_keys(tokens(32), "scheme"), "KeyScheme"),
        (lambda: KeyScheme(0, SCHEME.digest), "chunk_tokens"),
        (lambda: KeyScheme(16, "not-hex"), "digest"),
        (lambda: digest(tp_rank=2), r"tp_rank: expected an int in \[0, 2\)"),
        (lambda: digest(model=""), "model"),
        (lambda: key_chain_hash("kvtc-abc"), "expected"),
    ],
)
def test_bad_arguments(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_fast_on_a_long_prompt() -> None:
    scheme = KeyScheme(64, SCHEME.digest)
    toks = tokens(6144)
    chunk_keys(toks, scheme)
    runs = 20
    t0 = time.perf_counter()
    for _ in range(runs):
        keys = chunk_keys(toks, scheme)
    per_chunk = (time.perf_counter() - t0) / runs / len(keys)
    assert len(keys) == 96
    assert per_chunk < 100e-6, f"{per_chunk * 1e6:.1f} us per chunk"  # ~5 us here
