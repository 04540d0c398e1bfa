"""Joint encoding's reference blobs in the L3 tier (:mod:`~kvtc_sglang.cache.l3_tier` owns one
:class:`L3References`).

A chunk object holds a residual blob as a *joint* segment that names its reference (:class:`~.l3_objects.RefName`);
the reference is an object of its own, written once (before the first chunk that names it) and keyed by what it
is: ``kvtc-{deployment digest}-sha256(namespace seed, the reference blob's calibration id, positions and chunk
CRCs)``. So any replica, or this server after a restart, that fetches a chunk with a joint segment fetches the
reference too (a second lookup, after the chunks'), unless its :class:`~.joint.JointBook` holds that key already
(its own reference, or one fetched for another chunk). A reference that is missing or fails a check cuts the
chunks at the first segment that names it: a miss, and the request prefills from there. The residual's own
16-byte reference tag is checked against the reference at restore, as for any residual.

Grafting adopts a fetched reference into host memory beside its dependants (charged the ranks' agreed size) and
into the book, where it is pinned by its dependants like any reference (it is not indexed for new matches: its
token ids are not in the object).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..codec import BlobError
from ..codec.joint import reference_identity
from ..tiers.frame import FrameError, pack_object, unpack_object
from ..tiers.keys import KEY_PREFIX, KeyScheme
from .joint import JointBook, JointLink
from .l3_objects import JOINT, RefName, unpack_joint

_TAG = b"kvtc-l3-reference-v1"


def reference_key(scheme: KeyScheme, seed: str | None, header: Any) -> str:
    """The object key of the reference blob ``header`` describes, in the namespace of chain seed ``seed``."""
    h = hashlib.sha256(_TAG)
    h.update(bytes.fromhex(seed) if seed else b"\x00")
    h.update(reference_identity(header))
    return f"{KEY_PREFIX}-{scheme.digest}-{h.hexdigest()}"


class L3References:
    """Names, writes, fetches and checks the reference blobs of joint segments.

    Args:
        book: the cache's :class:`~.joint.JointBook`.
        joint_codec: reads residual and reference headers (``read_header``, ``reference.read_header``).
        scheme: this deployment's keys; ``secret``: the shared MAC secret, or ``None``.
    """

    def __init__(self, book: JointBook, joint_codec: Any, scheme: KeyScheme, secret: bytes | None) -> None:
        self.book = book
        self.codec = joint_codec
        self.scheme = scheme
        self.secret = secret

    # ----- writes -----

    def name(self, link: JointLink, seed: str | None) -> RefName:
        """The name a joint segment gives the reference of ``link`` (its key recorded in the book)."""
        ref = self.book.refs[link.ref]
        if ref.key is None:
            self.book.keyed(ref.id, reference_key(self.scheme, seed, ref.header))
        return RefName(str(ref.key), int(ref.header.positions[0]), ref.header.num_tokens, link.lo, link.hi)

    def builder(self, name: RefName, data: torch.Tensor, copied: Any) -> Any:
        """A function (for the client's writer thread) that frames reference ``name``'s bytes ``data`` [n] uint8 on
        the host once their copy ``copied`` is done (``None``: now)."""
        secret, digest = self.secret, self.scheme.digest

        def build() -> bytes:
            if copied is not None:
                copied.synchronize()
            return pack_object(data.numpy().tobytes(), key=name.key, digest=digest, start=name.start,
                               num_tokens=name.num_tokens, secret=secret)  # fmt: skip

        return build

    # ----- reads -----

    def residual(self, data: bytes) -> tuple[RefName, torch.Tensor, Any]:
        """``(reference name, residual blob [n] uint8 CPU, its header)`` of a joint segment's bytes;
        ``BlobError``/``ValueError``."""
        name, raw = unpack_joint(data)
        blob = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
        return name, blob, self.codec.read_header(blob)

    def missing(self, chunks: list[list[tuple]]) -> list[str]:
        """Keys of the references the chunks' joint segments name that the book does not hold (in order, once)."""
        out: dict[str, None] = {}
        for chunk in chunks:
            for seg in chunk:
                if seg[0] == JOINT and seg[5].key not in self.book.by_key:
                    out[seg[5].key] = None
        return list(out)

    def checked(self, names: dict[str, RefName], keys: list[str], objects: list[bytes]
                ) -> tuple[dict[str, tuple[torch.Tensor, Any]], int]:
        """The fetched references that pass every check (frame, calibration, positions): ``{key: (blob [n] uint8,
        header)}``, and how many were refused."""
        out, refused = {}, 0
        for key, data in zip(keys, objects, strict=True):
            name = names[key]
            try:
                payload = unpack_object(data, key=key, digest=self.scheme.digest, start=name.start,
                                        num_tokens=name.num_tokens, secret=self.secret)  # fmt: skip
                blob = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
                header = self.codec.reference.read_header(blob)
                if int(header.positions[0]) != name.start or header.num_tokens != name.num_tokens:
                    raise ValueError(f"reference positions {int(header.positions[0])}+{header.num_tokens}, "
                                     f"expected {name.start}+{name.num_tokens}")  # fmt: skip
            except (FrameError, BlobError, ValueError):
                refused += 1
                continue
            out[key] = (blob, header)
        return out, refused

    def linker(self, cache: Any, got: dict[str, tuple[torch.Tensor, Any]], pinned: list[int]) -> Any:
        """``graft_chunks``' ``link(node, name, charge)``: a joint segment grafted under ``node`` links to its
        reference held by the book, or adopted from ``got`` into host memory charged ``charge`` bytes (``None``
        when there is no room). The reference is pinned (``pinned``, unpinned after the graft): making room for
        the graft's blobs may drop its other dependants meanwhile. A reference neither held nor fetched (held when
        the chunks came back, freed since) ends the graft there, on every rank alike (their books are mirrored)."""

        def link(node: Any, name: RefName, charge: int) -> JointLink | None:
            ref_id = self.book.by_key.get(name.key)
            if ref_id is None:
                if name.key not in got:
                    return None  # held when the chunks came back, freed since with its last dependant: a miss
                blob, header = got[name.key]
                handle = cache.placement.admit(blob, node, cache.guards.protect, cache.eviction.drop_subtree,
                                               charge=charge)  # fmt: skip
                if handle is None:
                    return None
                ref_id = self.book.adopt(name.key, handle, header, node)
            self.book.pin(ref_id)
            pinned.append(ref_id)
            return JointLink(ref_id, name.lo, name.hi)

        return link

    @staticmethod
    def usable(chunks: list[list[tuple]], have: set[str]) -> int:
        """How many leading chunks have every joint segment's reference in ``have``."""
        for i, chunk in enumerate(chunks):
            if any(seg[0] == JOINT and seg[5].key not in have for seg in chunk):
                return i
        return len(chunks)
