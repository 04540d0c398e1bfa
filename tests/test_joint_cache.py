"""Joint encoding across requests: the residual codec, its calibration, and the cache on SGLang's real pool and
``RadixCache`` with the real model's K/V of the same real file read after three different histories.

References first: a residual decodes to exactly ``c_ref + dequantize(quantize(c - c_ref))`` in the reference
calibration's coefficient space (:func:`residual_ref`); restored K/V is compared with the exact K/V the model wrote.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from kvtc_sglang.cache.config import KVTCCacheConfig
from kvtc_sglang.cache.joint import JointBook, JointLink
from kvtc_sglang.cache.store import BlobHandle
from kvtc_sglang.codec import ArtifactError, KVTCCodec
from kvtc_sglang.codec.joint import BlobReferenceError, JointCodec, ResidualSource, load_joint, reference_tag
from kvtc_sglang.codec.quant import decode_coefficients, encode_coefficients
from kvtc_sglang.codec.residual_artifact import load_residual
from kvtc_sglang.workloads.invariants import check_invariants
from kvtc_sglang.workloads.replay import Driver, build_cache, build_pool

FUTURE = 1e9


def residual_ref(jc: JointCodec, c: tuple, c_ref: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """What a residual blob of ``c`` against ``c_ref`` decodes to, from the quantizer alone."""
    r = jc.residual
    out = []
    for x, x_ref, alloc, scale in zip(c, c_ref, (r.keys, r.values), r.fp8_scale, strict=True):
        d = decode_coefficients(encode_coefficients(x - x_ref, alloc, scale), alloc, scale, x.shape[0], x.shape[1])
        out.append(x_ref + d)
    return out[0], out[1]


class ModelKV:
    """The real model's K/V of each whole token sequence (prefilled once), as the replay driver's source."""

    def __init__(self, lm) -> None:
        self.lm = lm
        self._kv: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def kv(self, tokens: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
        from kvtc_sglang.calibration.model import prefill_kv

        key = tuple(tokens)
        if key not in self._kv:
            k, v, _ = prefill_kv(self.lm.model, torch.tensor(tokens), torch.bfloat16)  # [L, T, H, D]
            self._kv[key] = (k, v)
        k, v = self._kv[key]
        return k[:, start:], v[:, start:]


@pytest.fixture(scope="module")
def joint(joint_path, artifact):
    return load_joint(joint_path, expect=artifact.spec)


@pytest.fixture(scope="module")
def sessions(lm):
    """Three histories (prose of 150, 230 and 310 tokens) each followed by the same 448-token code file."""
    from kvtc_sglang.calibration.corpus import token_sequences

    prose, _ = token_sequences(lm.tokenizer, "evaluation", "prose", 1024, 2048)
    code, _ = token_sequences(lm.tokenizer, "evaluation", "code", 512, 512)
    file = code[0][:448].tolist()
    return [prose[0][i * 320 : i * 320 + n].tolist() + file for i, n in enumerate((150, 230, 310))], file


def test_residual_decodes_to_reference_plus_quantized_difference(joint, lm, sessions):
    seqs, file = sessions
    src = ModelKV(lm)
    copies = []
    for seq in seqs[:2]:
        k, v = src.kv(seq, 0)
        lo = len(seq) - len(file)
        copies.append((k[:, lo:], v[:, lo:], torch.arange(lo, len(seq))))
    (k0, v0, p0), (k1, v1, p1) = copies
    c0 = joint.reference.transform(k0, v0, p0)
    ref_blob, ref_c = joint.encode_reference(c0, p0, torch.bfloat16)
    header = joint.reference.read_header(ref_blob)
    assert torch.equal(ref_c[0], joint.reference.dequantize(joint.reference.quantize(*c0), len(file))[0])
    c1 = joint.reference.transform(k1, v1, p1)
    (blob,) = joint.encode_residuals([c1], [ref_c], [reference_tag(header, 0, len(file))], [p1], torch.bfloat16)
    src_ = ResidualSource(blob, ref_blob, header, 0, len(file))
    (got,) = joint.read_residuals([src_], [(torch.arange(len(file)), p1)], torch.device("cpu"))
    want = residual_ref(joint, c1, ref_c)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # The residual is far smaller than a blob of its own, and the copy decodes close to its exact K/V.
    plain = KVTCCodec(joint.reference.artifact).encode(k1, v1, p1)
    assert blob.numel() * 4 < plain.numel()
    k_pool = [torch.zeros(len(file), *k1.shape[2:], dtype=torch.bfloat16) for _ in range(k1.shape[0])]
    v_pool = [torch.zeros_like(b) for b in k_pool]
    joint.write_rows([got], k_pool, v_pool, [(torch.arange(len(file)), p1)])
    k2, v2 = torch.stack(k_pool), torch.stack(v_pool)
    k3, v3, _ = joint.reference.decode(ref_blob)  # the reference alone, at the first copy's positions
    assert rel_err(k2, k1) < 0.5 and rel_err(v2, v1) < 0.6
    assert rel_err(k2, k1) < rel_err(k3, k1)  # the residual corrects what the reference's own copy differs by
    # Decoded against another span of the same reference: refused, never wrong K/V.
    other = ResidualSource(blob, ref_blob, header, 0, len(file) - 1)
    with pytest.raises((BlobReferenceError, ValueError)):
        joint.read_residuals([other], [(torch.arange(len(file)), p1)], torch.device("cpu"))


def test_residual_calibration_is_checked(joint_path, joint, tmp_path):
    cal = load_residual(joint_path)
    assert cal.artifact_id == joint.artifact_id and cal.info["reference_file"]
    bad = tmp_path / "residual.safetensors"
    data = bytearray(joint_path.read_bytes())
    data[-3] ^= 0xFF  # a tensor byte
    bad.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="does not match its contents"):
        load_residual(bad)
    with pytest.raises(ArtifactError, match="not found"):
        load_joint(joint_path.parent.parent / "elsewhere.safetensors")
    alone = tmp_path / "alone.safetensors"
    alone.write_bytes(joint_path.read_bytes())  # its reference file is not beside it
    with pytest.raises(ArtifactError, match="not found"):
        load_joint(alone)


def make_joint_cache(codec, artifact, joint, slots: int = 4096, ps: int = 1):
    _, allocator = build_pool(artifact.spec, slots, ps)
    config = KVTCCacheConfig(calibration="unused-in-tests", encode="inline", window_tokens=128,
                             joint_calibration="in-test", joint_min_tokens=128)
    cache = build_cache(allocator, ps, codec, config)
    cache.enable_joint(joint)
    return cache


@pytest.mark.parametrize("ps", [1, 16])
def test_same_file_after_three_histories_shares_one_reference(codec, artifact, joint, lm, sessions, ps):  # noqa: PLR0917
    seqs, file = sessions
    cache = make_joint_cache(codec, artifact, joint, ps=ps)
    src = ModelKV(lm)
    drv = Driver(cache, src)
    for seq in seqs:  # each session reads the file, goes cold and is compressed before the next one comes
        drv.finish(drv.start(seq))
        cache.compress_idle(now=FUTURE)
        check_invariants(cache)
    s = cache.stats
    # The first copy is a plain blob; the second made the reference (and a residual of its own); the third is a
    # residual against that reference.
    assert (s.joint_references, s.joint_references_made, s.joint_residual_blobs) == (1, 1, 2)
    linked = [e for e in cache.io.entries.values() if e.joint is not None]
    plain = [e for e in cache.io.entries.values() if e.joint is None]
    assert len(linked) == 2 and {e.joint.ref for e in linked} == set(cache.io.joint.refs)
    shared = sum(e.num_tokens for e in linked) // 2
    assert shared >= len(file) - 128 - 2 * ps  # the file less its window, page-aligned
    per_plain = sum(e.handle.nbytes for e in plain) / sum(e.num_tokens for e in plain)
    per_residual = s.joint_residual_bytes / s.joint_residual_tokens
    assert per_residual * 4 < per_plain
    # Restores: every session comes back whole, its K/V close to what the model wrote.
    for seq in seqs[::-1]:
        n, k, v = drv.read_prefix([*seq, 7])
        assert n == len(seq) // ps * ps
        k_ref, v_ref = src.kv(seq, 0)
        assert rel_err(k, k_ref[:, :n]) < 0.35 and rel_err(v, v_ref[:, :n]) < 0.5
        check_invariants(cache)
    assert s.joint_restored_tokens == 2 * shared and s.restore_failures == s.checksum_failures == 0
    # Going cold again frees slots only (kept blobs); dropping every blob frees the reference with the last one.
    cache.compress_idle(now=FUTURE)
    assert s.joint_references == 1
    cache.evict_steps.free(10**9)  # everything, blobs included
    cache.reset()
    assert s.joint_references == s.joint_residual_blobs == s.joint_reference_bytes == 0
    check_invariants(cache)


def test_damaged_reference_is_a_miss_never_wrong_kv(codec, artifact, joint, lm, sessions):
    seqs, _ = sessions
    cache = make_joint_cache(codec, artifact, joint)
    src = ModelKV(lm)
    drv = Driver(cache, src)
    for seq in seqs:
        drv.finish(drv.start(seq))
        cache.compress_idle(now=FUTURE)
    (ref,) = cache.io.joint.refs.values()
    blob = cache.store.get(ref.handle)
    blob[blob.numel() // 2] ^= 0x5A
    cache.store.free(ref.handle)
    ref.handle = cache.store.put(blob)  # the stored reference is damaged (its dependants are intact)
    k_ref, _ = src.kv(seqs[2], 0)
    n, k, _ = drv.read_prefix([*seqs[2], 7])
    # The match stops before the node whose reference is damaged (that node is dropped): recompute, and what is
    # restored before it is exact or within the codec's error.
    assert cache.stats.checksum_failures == 1 and n < len(seqs[2])
    assert rel_err(k, k_ref[:, :n]) < 0.35
    check_invariants(cache)


class _Key:
    """A radix key's surface the book reads: token ids and the namespaces."""

    def __init__(self, tokens: list[int], extra_key: str | None = None, cache_salt: str | None = None) -> None:
        self.tokens, self.extra_key, self.cache_salt = tokens, extra_key, cache_salt

    def raw_token_ids(self) -> list[int]:
        return self.tokens

    def __len__(self) -> int:
        return len(self.tokens)


class _Node:
    def __init__(self, key: _Key) -> None:
        self.key = key


def _book(freed: list) -> JointBook:
    from kvtc_sglang.cache.stats import KVTCStats

    return JointBook(fetch=lambda h: h, free=freed.append, stats=KVTCStats(), page_size=1, min_tokens=32,
                     seen_tokens=10_000)


def _handle(nbytes: int = 100) -> BlobHandle:
    return BlobHandle(torch.zeros(1, dtype=torch.int64), nbytes)


def test_reference_lives_while_pinned_or_depended_on_and_goes_with_the_last():
    freed: list = []
    book = _book(freed)
    text = list(range(1000, 1200))
    ref = book.add_reference(_handle(), header=None, node=_Node(_Key(text)), tokens=tuple(text))  # type: ignore[arg-type]
    link = JointLink(ref, 0, 200)
    book.depend(link, 200, 10)
    book.pin(ref)  # a queued encode reads it
    book.release(link, 200, 10)  # its only blob goes: the queued encode still holds it
    assert book.alive(ref) and not freed
    book.unpin(ref)  # committed: nothing depends on it now
    assert not book.alive(ref) and len(freed) == 1
    assert book.stats.joint_references == book.stats.joint_reference_bytes == 0
    assert book.stats.joint_references_dropped == 1


def test_text_is_shared_within_a_namespace_only():
    book = _book([])
    text = list(range(5000, 5300))
    for ns in (None, "lora-a"):
        book.remember(_Node(_Key([1, 2, 3, *text], extra_key=ns)))
    # the same text after another history, in each namespace: a match (its second copy makes a reference)
    for ns in (None, "lora-a"):
        [(start, length, plan)] = book.matches(_Node(_Key([9, 9, *text, 7], extra_key=ns)))
        assert (start, length, plan.ref) == (2, 300, None)
    assert book.matches(_Node(_Key([9, 9, *text], extra_key="lora-b"))) == []  # another LoRA: never shared
    assert book.matches(_Node(_Key([9, 9, *text], cache_salt="tenant-2"))) == []  # another tenant: never shared


def test_one_reference_per_text_while_the_first_is_being_made():
    book = _book([])
    text = list(range(7000, 7400))
    book.remember(_Node(_Key([1, *text])))
    [(_, _, plan)] = book.matches(_Node(_Key([2, 2, *text])))  # the second copy: it makes the reference
    assert plan.ref is None
    assert book.matches(_Node(_Key([3, 3, 3, *text]))) == []  # the third, before that commit: a plain blob
