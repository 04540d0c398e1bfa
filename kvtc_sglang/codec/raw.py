"""Identity ("raw") codec: the :class:`~.codec.KVTCCodec` interface the cache uses, storing KV rows verbatim.

A baseline for benchmarks: the same cache machinery (store, restore path, every blob check) with an
uncompressed tier, so ratio ~1x (a little under, for the header). Imports torch, never SGLang.

Blob: the framing of :mod:`.blob` (magic, version, header CRC32, artifact id, ``L, H, D``, dtype, positions,
chunk table with a CRC32 per chunk), with every chunk *stored*: its table entry has stored length == raw
length, and its bytes are the payload's bytes. The payload of a segment of ``T`` tokens is::

    K [L, T, H, D] then V [L, T, H, D], C order, in the pool dtype (native byte order: little endian)

i.e. layer by layer, each layer's rows in the order of the segment's slots; ``payload_nbytes(T) =
2 * L * T * H * D * itemsize``, cut into ``chunk_bytes`` chunks.

Artifact id: ``b"RAW"`` + the first 5 bytes of SHA-256 over a raw-codec tag and the model spec's JSON, so
a raw blob names the raw codec and the model (and ``tp_rank``) it holds. A KVTC codec refuses it (its id is
a calibration's fingerprint) and this codec refuses a KVTC blob, both with ``BlobCalibrationMismatchError``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch

from .blob import BlobHeader, checked_header, header_nbytes, headers_of, verify_chunks_many
from .checks import check_kv, check_layers, check_positions
from .codec import DEFAULT_CHUNK_BYTES, _as_tensor
from .crc import crc32_many
from .errors import (
    BlobChecksumError,
    BlobPositionsError,
    BlobTruncatedError,
)
from .framing import wrap_payloads
from .spec import DTYPES, ModelSpec

RAW_ID_PREFIX = b"RAW"
_RAW_ID_TAG = b"kvtc-sglang raw codec v1\0"


def raw_artifact_id(spec: ModelSpec) -> bytes:
    """The 8-byte id of raw blobs of ``spec``: ``b"RAW"`` + 5 bytes of SHA-256 over a tag and the spec."""
    digest = hashlib.sha256(_RAW_ID_TAG + json.dumps(spec.to_json(), sort_keys=True).encode()).digest()
    return RAW_ID_PREFIX + digest[: 8 - len(RAW_ID_PREFIX)]


class StoredChunks:
    """The identity :class:`~.entropy.EntropyCoder`: chunks are stored as they are (``compress`` returns them)."""

    name = "stored"

    def compress(self, chunks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(chunks)

    def decompress(self, chunks: Sequence[torch.Tensor], raw_sizes: Sequence[int]) -> list[torch.Tensor]:
        for i, (c, size) in enumerate(zip(chunks, raw_sizes, strict=True)):
            if c.numel() != size:
                raise BlobChecksumError(f"stored chunk {i} has {c.numel()} bytes, expected {size}")
        return list(chunks)


class RawCodec:
    """Store ``[L, T, H, D]`` K/V (or pool rows) uncompressed in a checked blob and back, bit-exact.

    Args:
        spec: the model's KV geometry (as ``KVTCCodec.spec``); blobs are for this spec only.
        chunk_bytes: payload bytes per chunk (each chunk has its own length and CRC32 in the table).

    Any pool dtype of :data:`~.checks.KV_DTYPES` is stored as is; the blob records it.
    """

    def __init__(self, spec: ModelSpec, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        self.spec = spec
        self.chunk_bytes = chunk_bytes
        self.artifact_id = raw_artifact_id(spec)
        self._coder = StoredChunks()

    def prepare(self, device: torch.device) -> None:
        """Build the CRC tables for ``device`` now (before worker threads use them); nothing else to make."""
        crc32_many([torch.zeros(16, dtype=torch.uint8, device=device)])

    def payload_nbytes(self, num_tokens: int, dtype: torch.dtype | None = None) -> int:
        """Bytes of K and V of ``num_tokens`` tokens in ``dtype`` (default: the spec's dtype)."""
        s = self.spec
        itemsize = _itemsize(dtype if dtype is not None else DTYPES[s.dtype])
        return 2 * s.num_features * num_tokens * itemsize

    def max_blob_nbytes(self, num_tokens: int, dtype: torch.dtype | None = None) -> int:
        """Upper bound of a blob's size (explicit positions; exact payload): header + :meth:`payload_nbytes`."""
        raw = self.payload_nbytes(num_tokens, dtype)
        n_chunks = max(1, -(-raw // self.chunk_bytes))
        return header_nbytes(num_tokens, n_chunks, explicit_positions=True) + raw

    # ----- encode -----

    def encode(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Store one segment: ``k``, ``v`` ``[L, T, H, D]`` fp16/bf16/fp32, ``positions [T]`` integer.

        Returns the blob, ``[n]`` uint8 on ``k.device``, ``n <= max_blob_nbytes(T, k.dtype)``.
        """
        check_kv(self.spec, k, v, positions)
        payload = torch.cat([_bytes(k), _bytes(v)])  # [payload_nbytes(T)] uint8
        return self._wrap([payload], [positions], k.dtype)[0]

    def encode_rows_many(
        self,
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        segments: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> list[torch.Tensor]:
        """Store the rows of per-layer pool buffers, one blob per ``(slots [T_i], positions [T_i])`` segment.

        Args:
            k_layers, v_layers: ``L`` tensors ``[N, H, D]`` each (post-RoPE keys, values), one dtype and device.
            segments: integer rows of the buffers and their absolute positions.

        Returns:
            One ``[n_i]`` uint8 blob per segment on the buffers' device.
        """
        check_layers(self.spec, k_layers, v_layers)
        device = k_layers[0].device
        payloads = []
        for slots, positions in segments:
            if slots.dim() != 1 or slots.dtype.is_floating_point:
                raise ValueError(f"slots must be a 1-D integer tensor, got {slots.dtype} {list(slots.shape)}")
            check_positions(positions, slots.numel())
            rows = slots.to(device, torch.int64)
            payloads.append(torch.cat([_bytes(b.index_select(0, rows)) for b in (*k_layers, *v_layers)]))
        return self._wrap(payloads, [pos for _, pos in segments], k_layers[0].dtype)

    def _wrap(
        self, payloads: list[torch.Tensor], positions: list[torch.Tensor], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        if not payloads:
            return []
        s = self.spec
        return wrap_payloads(
            self._coder, payloads, positions, dtype=dtype, chunk_bytes=self.chunk_bytes,
            artifact_id=self.artifact_id, shape=(s.num_layers, s.num_kv_heads, s.head_dim),
        )  # fmt: skip

    # ----- decode -----

    def read_header(self, blob: torch.Tensor | bytes) -> BlobHeader:
        """Validate a blob's header against this codec's id and geometry (copies only the header)."""
        s = self.spec
        return checked_header(blob, self.artifact_id, (s.num_layers, s.num_kv_heads, s.head_dim), "codec")

    def _headers(self, blobs: list[torch.Tensor]) -> list[BlobHeader]:
        return headers_of(self.read_header, blobs)

    def decode(
        self, blob: torch.Tensor | bytes, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A blob back to ``(k, v, positions)``: ``[L, T, H, D]`` in the stored dtype, ``[T]`` int64, on ``device``
        (default: the blob's). Raises a :class:`~.errors.BlobError` subclass for any defective or foreign blob."""
        if device is None:
            device = blob.device if isinstance(blob, torch.Tensor) else torch.device("cpu")
        src = _as_tensor(blob)
        [header] = self._headers([src])
        [payload] = self._unwrap([src], [header], device)
        kv = _rows(payload, header, self.spec)  # [2, L, T, H, D]
        return kv[0], kv[1], header.positions.to(device)

    def read_blobs(
        self,
        blobs: Sequence[torch.Tensor | bytes],
        headers: list[BlobHeader],
        targets: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
    ) -> list[torch.Tensor]:
        """Every check of every blob against its header and target (positions, token count, chunk sizes,
        CRC32s); returns the payloads ``[payload_nbytes(T_i, dtype_i)]`` uint8 on ``device``, copies that do not
        alias the blobs. Touches no pool row. A bad blob raises a ``BlobError`` whose ``blob_index`` names it."""
        if len(targets) != len(blobs) or len(headers) != len(blobs):
            raise ValueError(
                f"{len(blobs)} blobs need as many targets and headers, got {len(targets)} targets and "
                f"{len(headers)} headers"
            )
        for i, (header, (slots, positions)) in enumerate(zip(headers, targets, strict=True)):
            have, want = header.positions.cpu(), positions.cpu().to(header.positions.dtype)
            if not torch.equal(have, want):
                raise BlobPositionsError(_positions_differ(have, want)).at(i)
            if slots.numel() != header.num_tokens:
                raise ValueError(
                    f"blob holds {header.num_tokens} tokens, destination is {slots.numel()} rows "
                    f"(blob {i} of {len(blobs)})"
                )
        return self._unwrap([_as_tensor(b) for b in blobs], headers, device)

    def _unwrap(self, blobs: list[torch.Tensor], headers: list[BlobHeader], device: torch.device) -> list[torch.Tensor]:
        """Check chunk sizes (stored, and summing to the payload) and CRC32s; the payloads, copied to ``device``."""
        for i, header in enumerate(headers):
            for j, (stored, raw, _) in enumerate(header.chunks):
                if stored != raw:
                    raise BlobChecksumError(f"chunk {j} is not stored: {stored} bytes in the blob, {raw} raw").at(i)
            raw_bytes = sum(c[1] for c in header.chunks)
            need = self.payload_nbytes(header.num_tokens, header.dtype)
            if raw_bytes != need:
                raise BlobChecksumError(
                    f"chunk table holds {raw_bytes} bytes, {header.num_tokens} {header.dtype} tokens need {need}"
                ).at(i)
            if blobs[i].numel() != header.data_offset + raw_bytes:  # headers kept from encode: the blob may differ
                raise BlobTruncatedError(
                    f"blob has {blobs[i].numel()} bytes, its header says {header.data_offset + raw_bytes}"
                ).at(i)
        verify_chunks_many(blobs, headers)
        out = []
        for blob, header in zip(blobs, headers, strict=True):
            body = blob[header.data_offset :]  # the stored chunks, back to back: the payload
            out.append(body.to(device, copy=True))
        return out

    def write_rows_many(
        self,
        payloads: list[torch.Tensor],
        headers: list[BlobHeader],
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        targets: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Payloads from :meth:`read_blobs` into the pool rows ``targets[i][0]`` of ``L`` buffers ``[N, H, D]``
        each, whose dtype must be the blobs'. On CUDA: copies and index kernels only, no host sync."""
        check_layers(self.spec, k_layers, v_layers)
        dtype, device = k_layers[0].dtype, k_layers[0].device
        for i, header in enumerate(headers):
            if header.dtype != dtype:
                raise ValueError(f"blob {i} of {len(headers)} holds {header.dtype} tokens, the pool is {dtype}")
        for payload, header, (slots, _) in zip(payloads, headers, targets, strict=True):
            kv = _rows(payload.to(device), header, self.spec)  # [2, L, T, H, D]
            rows = slots.to(device, torch.int64)
            for layer, (kb, vb) in enumerate(zip(k_layers, v_layers, strict=True)):
                kb.index_copy_(0, rows, kv[0, layer])
                vb.index_copy_(0, rows, kv[1, layer])


def _positions_differ(have: torch.Tensor, want: torch.Tensor) -> str:
    if have.numel() != want.numel():
        return f"blob holds {have.numel()} positions, the destination {want.numel()}"
    j = int((have != want).nonzero()[0, 0])
    return f"blob position {int(have[j])} at token {j} of {have.numel()}, the destination has {int(want[j])}"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements in C order as ``[nbytes]`` uint8 (a view when ``t`` is contiguous)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def _rows(payload: torch.Tensor, header: BlobHeader, spec: ModelSpec) -> torch.Tensor:
    """A checked payload ``[payload_nbytes(T)]`` uint8 as ``[2, L, T, H, D]`` ``header.dtype`` (K, V), a view."""
    shape = (2, spec.num_layers, header.num_tokens, spec.num_kv_heads, spec.head_dim)
    return payload.view(header.dtype).view(shape)
