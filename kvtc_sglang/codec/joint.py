"""Joint encoding across requests, the codec side: a span of text already held by a *reference* blob is coded as
a quantized residual against the reference's coefficients.

Both live in the reference calibration's coefficient space (``c [T, R] = ((x - mean) / scale) @ basis`` of the
RoPE-free keys and the values, each token at its own position, so a copy of the text at another offset is
comparable): a reference blob is an ordinary KVTC blob of that calibration (made at a low ratio, 8x, so that it
carries copies well); a residual blob holds ``d = c - c_ref[lo:hi]`` quantized with the
:class:`~.residual_artifact.ResidualCalibration`'s allocation and decodes to ``c_ref[lo:hi] + d'``, re-rotated at
its own positions. A residual blob is the ordinary blob container (header, chunk CRC32s, positions) whose
calibration id is the residual calibration's and whose payload starts with the 16-byte tag of the reference span it
was coded against (:func:`reference_tag`): decoded against any other span it raises :class:`BlobReferenceError`.

Torch only (the projections on the blob's device through the reference codec's torch backend); no SGLang.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .artifact import load_artifact
from .backend import TorchBackend
from .blob import BlobHeader, checked_header, headers_of
from .codec import DEFAULT_CHUNK_BYTES, KVTCCodec
from .errors import ArtifactError, BlobError, BlobPositionsError
from .framing import unwrap_payloads, wrap_payloads
from .quant import decode_coefficients, encode_coefficients, payload_nbytes
from .residual_artifact import ResidualCalibration, load_residual
from .spec import ModelSpec

TAG_BYTES = 16


class BlobReferenceError(BlobError):
    """A residual blob is intact but was coded against another reference span than the one given."""


def reference_tag(header: BlobHeader, lo: int, hi: int) -> bytes:
    """16 bytes naming tokens ``[lo, hi)`` of the reference blob ``header`` describes (its calibration, positions,
    and every chunk's length and CRC32)."""
    if not 0 <= lo < hi <= header.num_tokens:
        raise ValueError(f"reference span [{lo}, {hi}) must lie in the reference's {header.num_tokens} tokens")
    return hashlib.blake2b(reference_identity(header), digest_size=TAG_BYTES - 8).digest() + struct.pack("<ii", lo, hi)


def reference_identity(header: BlobHeader) -> bytes:
    """What names a reference blob: its calibration id, first position, token count, and every chunk's length and
    CRC32 (hashed into the residuals' tags and the reference's L3 key)."""
    parts = [header.artifact_id, struct.pack("<qq", int(header.positions[0]), header.num_tokens)]
    return b"".join(parts + [struct.pack("<III", *chunk) for chunk in header.chunks])


@dataclass(frozen=True)
class ResidualSource:
    """What a residual restore reads: the residual blob and its reference blob, header and span ``[lo, hi)``."""

    blob: torch.Tensor
    reference: torch.Tensor
    reference_header: BlobHeader
    lo: int
    hi: int


class JointCodec:
    """Reference and residual blobs of one reference calibration.

    Args:
        reference: the codec of the reference calibration (its blobs are the references).
        residual: residuals fitted against that calibration (checked).
        chunk_bytes: raw payload bytes per DEFLATE chunk of a residual blob.
    """

    def __init__(self, reference: KVTCCodec, residual: ResidualCalibration, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        residual.check_reference(reference.artifact)
        self.reference = reference
        self.residual = residual
        self.spec = reference.spec
        self.artifact_id = residual.artifact_id
        self.chunk_bytes = chunk_bytes
        self._fp8: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _backend(self, device: torch.device) -> TorchBackend:
        """The reference codec's torch backend for ``device``: its own (with its ``dot_precision``, bf16 projections
        on a CPU that has them) where that is the torch one, else a plain fp32 one (the Triton kernels have no
        residual path)."""
        backend = self.reference.payload_backend(device)
        return backend if isinstance(backend, TorchBackend) else self.reference._torch(device)  # noqa: SLF001

    def _scales(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._fp8:
            self._fp8[device] = (self.residual.fp8_scale[0].to(device), self.residual.fp8_scale[1].to(device))
        return self._fp8[device]

    def payload_nbytes(self, num_tokens: int) -> int:
        """Raw bytes of a residual payload for ``num_tokens`` tokens: the tag, then K's and V's codes."""
        r = self.residual
        return TAG_BYTES + payload_nbytes(r.keys, num_tokens) + payload_nbytes(r.values, num_tokens)

    # ----- encode -----

    def coefficients_rows(
        self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor], slots: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool rows ``slots [T]`` (at ``positions [T]``) in the reference's space: ``([T, R_k], [T, R_v])``."""
        return self._backend(k_layers[0].device).coefficients_rows(k_layers, v_layers, slots, positions)

    def encode_reference(
        self, coeffs: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """A reference blob of ``coeffs`` (tokens at ``positions [T]``, pool ``dtype``) and the coefficients it
        decodes to, ``([T, R_k], [T, R_v])``: what a residual against it must be taken from."""
        backend = self._backend(coeffs[0].device)
        payload = backend.quantize(*coeffs)
        (blob,) = self.reference._wrap_many([payload], [positions], dtype)  # noqa: SLF001
        return blob, backend.dequantize(payload, positions.numel())

    def reference_coefficients(self, payload: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A reference's raw payload (see :meth:`read_references`) -> ``([T, R_k], [T, R_v])`` float32."""
        return self._backend(payload.device).dequantize(payload, num_tokens)

    def read_references(self, blobs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """Check (header, CRC32s) and inflate reference blobs: raw payloads on ``device`` (``BlobError`` names the
        blob)."""
        headers = headers_of(self.reference.read_header, blobs)
        return self.reference._unwrap_many(blobs, headers, device)  # noqa: SLF001

    def encode_residuals(
        self,
        coeffs: list[tuple[torch.Tensor, torch.Tensor]],
        references: list[tuple[torch.Tensor, torch.Tensor]],
        tags: list[bytes],
        positions: list[torch.Tensor],
        dtype: torch.dtype,
    ) -> list[torch.Tensor]:
        """Residual blobs of ``coeffs[i]`` against ``references[i]`` (the reference span's decoded coefficients,
        same shapes), each naming its span by ``tags[i]``; the DEFLATE chunks of all in one entropy call."""
        payloads = []
        for (ck, cv), (rk, rv), tag in zip(coeffs, references, tags, strict=True):
            if ck.shape != rk.shape or cv.shape != rv.shape:
                raise ValueError(f"coefficients {list(ck.shape)} and reference {list(rk.shape)} differ in shape")
            sk, sv = self._scales(ck.device)
            head = torch.frombuffer(bytearray(tag), dtype=torch.uint8).to(ck.device)
            payloads.append(torch.cat([head, encode_coefficients(ck - rk, self.residual.keys, sk),
                                       encode_coefficients(cv - rv, self.residual.values, sv)]))
        if not payloads:
            return []
        s = self.spec
        return wrap_payloads(self.reference._coder(payloads[0].device), payloads, positions, dtype=dtype,  # noqa: SLF001
                             chunk_bytes=self.chunk_bytes, artifact_id=self.artifact_id,
                             shape=(s.num_layers, s.num_kv_heads, s.head_dim))

    # ----- decode -----

    def read_header(self, blob: torch.Tensor) -> BlobHeader:
        s = self.spec
        shape = (s.num_layers, s.num_kv_heads, s.head_dim)
        return checked_header(blob, self.artifact_id, shape, "residual calibration")

    def read_residuals(
        self, sources: list[ResidualSource], targets: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every check of every source (headers, CRC32s, positions, the reference tag) and the inflates: decoded
        coefficients ``([T_i, R_k], [T_i, R_v])`` on ``device``. Touches no pool row. ``BlobError`` names the
        source."""
        heads = []
        for i, (src, (slots, positions)) in enumerate(zip(sources, targets, strict=True)):
            try:
                header = self.read_header(src.blob)
            except BlobError as e:
                raise e.at(i) from None
            if not torch.equal(header.positions, positions.cpu().to(header.positions.dtype)):
                raise BlobPositionsError(f"residual blob positions differ from the target's (source {i})").at(i)
            if slots.numel() != header.num_tokens or src.hi - src.lo != header.num_tokens:
                raise ValueError(f"residual {i} holds {header.num_tokens} tokens, its target {slots.numel()} rows "
                                 f"and its reference span {src.hi - src.lo}")
            heads.append(header)
        first: dict[int, int] = {}  # each reference is checked, inflated and dequantized once per call
        for i, src in enumerate(sources):
            first.setdefault(id(src.reference_header), i)
        unique = list(first.values())
        try:
            payloads = self.read_references([sources[i].reference for i in unique], device)
        except BlobError as e:
            raise e.at(unique[e.blob_index or 0]) from None
        coeffs = {}
        for i, payload in zip(unique, payloads, strict=True):
            header = sources[i].reference_header
            coeffs[id(header)] = self.reference_coefficients(payload, header.num_tokens)
        raws = unwrap_payloads(self.reference._coder(device), [s.blob for s in sources], heads, device,  # noqa: SLF001
                               self.payload_nbytes)
        out = []
        for i, (src, header, raw) in enumerate(zip(sources, heads, raws, strict=True)):
            if bytes(raw[:TAG_BYTES].cpu().tolist()) != reference_tag(src.reference_header, src.lo, src.hi):
                raise BlobReferenceError(f"residual blob {i} was coded against another reference span").at(i)
            rk, rv = coeffs[id(src.reference_header)]
            n, r = header.num_tokens, self.residual
            nk = payload_nbytes(r.keys, n)
            sk, sv = self._scales(device)
            dk = decode_coefficients(raw[TAG_BYTES : TAG_BYTES + nk], r.keys, sk, n, rk.shape[1])
            dv = decode_coefficients(raw[TAG_BYTES + nk :], r.values, sv, n, rv.shape[1])
            out.append((rk[src.lo : src.hi] + dk, rv[src.lo : src.hi] + dv))
        return out

    def write_rows(
        self,
        coeffs: list[tuple[torch.Tensor, torch.Tensor]],
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        targets: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Decoded coefficients (:meth:`read_residuals`) into the pool rows ``targets[i][0]``, keys rotated at
        ``targets[i][1]``, in the buffers' dtype."""
        backend = self._backend(k_layers[0].device)
        for c, (slots, positions) in zip(coeffs, targets, strict=True):
            backend.write_coefficients(c, k_layers, v_layers, slots, positions)


class MixedCodec:
    """One restore call for plain blobs of ``base`` and residual sources of ``joint`` (what
    :meth:`~kvtc_sglang.cache.controller.KVTCController.restore` calls): every check of every blob runs before the
    first row is written; a ``BlobError`` names the blob by its index in the whole call. Plain blobs go through
    ``base``'s one batched call, residual sources (and their references) through ``joint``'s."""

    def __init__(self, base: KVTCCodec, joint: JointCodec) -> None:
        self.base = base
        self.joint = joint

    @staticmethod
    def _split(items: list) -> tuple[list[int], list[int]]:
        residual = [i for i, b in enumerate(items) if isinstance(b, ResidualSource)]
        plain = [i for i, b in enumerate(items) if not isinstance(b, ResidualSource)]
        return plain, residual

    def read_blobs(
        self,
        blobs: list[torch.Tensor | ResidualSource],
        headers: list[BlobHeader],
        targets: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
    ) -> list[Any]:
        plain, residual = self._split(blobs)
        out: list[Any] = [None] * len(blobs)
        for idx, read in ((plain, lambda ix: self.base.read_blobs([blobs[i] for i in ix], [headers[i] for i in ix],
                                                                   [targets[i] for i in ix], device)),
                          (residual, lambda ix: self.joint.read_residuals([blobs[i] for i in ix],
                                                                          [targets[i] for i in ix], device))):
            if not idx:
                continue
            try:
                got = read(idx)
            except BlobError as e:
                raise e.at(idx[e.blob_index or 0]) from None
            for i, payload in zip(idx, got, strict=True):
                out[i] = payload
        return out

    def write_rows_many(
        self,
        payloads: list[Any],
        headers: list[BlobHeader],
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        targets: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        for i, header in enumerate(headers):
            if header.dtype != k_layers[0].dtype:
                raise ValueError(f"blob {i} of {len(headers)} holds {header.dtype} tokens, the pool is "
                                 f"{k_layers[0].dtype}")
        residual = [i for i, p in enumerate(payloads) if isinstance(p, tuple)]
        plain = [i for i, p in enumerate(payloads) if not isinstance(p, tuple)]
        if plain:
            self.base.write_rows_many([payloads[i] for i in plain], [headers[i] for i in plain], k_layers, v_layers,
                                      [targets[i] for i in plain])
        if residual:
            self.joint.write_rows([payloads[i] for i in residual], k_layers, v_layers, [targets[i] for i in residual])


def load_joint(path: str | Path, expect: ModelSpec | None = None, **codec_options: Any) -> JointCodec:
    """The :class:`JointCodec` of the residual calibration at ``path`` and its reference calibration, the file its
    header names (``info["reference_file"]``) in the same folder, checked against each other and ``expect``.
    ``codec_options``: the reference :class:`~.codec.KVTCCodec`'s (``chunk_bytes``, ``dot_precision``)."""
    path = Path(path)
    residual = load_residual(path)
    name = residual.info.get("reference_file")
    if not isinstance(name, str) or not name:
        raise ArtifactError(f"{path}: the residual calibration does not name its reference calibration file")
    reference = load_artifact(path.parent / name, expect=expect)
    return JointCodec(KVTCCodec(reference, **codec_options), residual)
