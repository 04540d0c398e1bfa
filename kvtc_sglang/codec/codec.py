"""KVTC transform coder: RoPE removal, cross-layer PCA, DP-allocated quantization, DEFLATE.

Plan once (``KVTCCodec(artifact)`` moves the basis to each device on first use), run many
(``encode`` / ``decode``, or ``encode_rows`` / ``decode_rows`` straight from and into per-layer KV-pool
buffers). Sinks and the recent window are the caller's concern: the codec encodes exactly the tokens it
is given.

Kernels: the payload (coefficients and packed codes) is made by a payload backend (:mod:`.backend`,
:meth:`KVTCCodec.payload_backend`), chosen once per device: the fused Triton kernels for CUDA tensors,
plain torch for CPU tensors; both write the same payload format, and for the same coefficients the same bytes.
``kernels="triton"`` forces the Triton path (on the CPU only under ``TRITON_INTERPRET=1``).

SGLang's ``MHATokenToKVPool`` keeps one ``[num_slots, H, D]`` K and V buffer per layer; a radix node is a
list of slot indices. ``encode_rows`` / ``decode_rows`` take those lists: the Triton backend reads and
writes the rows in place, the torch backend gathers (scatters) them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .artifact import CalibrationArtifact
from .backend import DeviceStreams, PayloadBackend, TorchBackend, check_torch_dot_precision
from .blob import BlobHeader, checked_header, header_nbytes, headers_of
from .checks import check_kv, check_layers, check_positions
from .entropy import EntropyCoder, default_entropy_coder
from .errors import BlobPositionsError
from .framing import unwrap_payloads, wrap_payloads
from .quant import payload_nbytes

DEFAULT_CHUNK_BYTES = 1 << 16
KERNELS = ("auto", "torch", "triton")
ALL_DOT_PRECISIONS = ("ieee", "tf32x3", "tf32", "bf16")  # Triton's three, and the torch backend's bf16


def _as_tensor(blob: torch.Tensor | bytes) -> torch.Tensor:
    """A blob as a ``[n] uint8`` tensor: a tensor as is, bytes as a CPU tensor (a copy)."""
    if not isinstance(blob, (bytes, bytearray)):
        return blob
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)


class KVTCCodec:
    """Encode ``[L, T, H, D]`` K/V into one blob and back.

    Args:
        artifact: calibration for this model (PCA bases, bit allocations, RoPE settings).
        entropy: lossless stage; default: nvCOMP for CUDA tensors, zlib for CPU tensors.
        chunk_bytes: raw payload bytes per DEFLATE chunk (each chunk has its own length and CRC32).
        kernels: payload backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"torch"`` or
            ``"triton"``.
        dot_precision: the projections' precision: ``"ieee"`` (exact fp32, default, both backends); for the
            Triton kernels ``"tf32x3"`` or ``"tf32"`` (tensor cores; faster, less exact); for the torch backend
            ``"bf16"`` (bf16 inputs, fp32 accumulation: ~4x faster on CPUs with AVX512-BF16/AMX). Checked when
            a backend is selected (at construction for ``kernels="torch"``/``"triton"``).
    """

    def __init__(
        self,
        artifact: CalibrationArtifact,
        entropy: EntropyCoder | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        kernels: str = "auto",
        dot_precision: str = "ieee",
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        if kernels == "torch":
            check_torch_dot_precision(dot_precision)
        elif dot_precision not in ALL_DOT_PRECISIONS:
            raise ValueError(f"dot_precision must be one of {ALL_DOT_PRECISIONS}, got {dot_precision!r}")
        self.kernels = kernels
        self.dot_precision = dot_precision
        self.artifact = artifact
        self.spec = artifact.spec
        self.artifact_id = artifact.artifact_id
        self.chunk_bytes = chunk_bytes
        self._entropy = entropy
        self._streams: dict[torch.device, DeviceStreams] = {}
        self._backends: dict[torch.device, PayloadBackend] = {}
        self._coders: dict[torch.device, EntropyCoder] = {}
        if kernels == "triton":  # fail here, not on the first encode, if Triton or the precision is wrong
            from .backend_triton import check_dot_precision

            check_dot_precision(dot_precision)

    def _device_streams(self, device: torch.device) -> DeviceStreams:
        if device not in self._streams:
            self._streams[device] = DeviceStreams.build(self.artifact, device)
        return self._streams[device]

    def payload_backend(self, device: torch.device) -> PayloadBackend:
        """The payload backend for tensors on ``device``, made once per device."""
        if device not in self._backends:
            streams = self._device_streams(device)
            if self.uses_triton(device):
                from .backend_triton import TritonBackend  # optional dependency: only this path needs Triton

                self._backends[device] = TritonBackend(self.spec, streams, self.dot_precision)
            else:
                self._backends[device] = TorchBackend(self.spec, streams, self.dot_precision)
        return self._backends[device]

    def _torch(self, device: torch.device) -> TorchBackend:
        return TorchBackend(self.spec, self._device_streams(device))

    def uses_triton(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` go through the Triton backend."""
        return self.kernels == "triton" or (self.kernels == "auto" and device.type == "cuda")

    def prepare(self, device: torch.device) -> None:
        """Make the payload backend and entropy coder for ``device`` now (before worker threads use them)."""
        self.payload_backend(device)
        self._coder(device)

    def _coder(self, device: torch.device) -> EntropyCoder:
        """The entropy coder for ``device``: the one given, else the default, made once per device."""
        if self._entropy is not None:
            return self._entropy
        if device not in self._coders:  # nvCOMP keeps one codec per stream inside: reuse it
            self._coders[device] = default_entropy_coder(device)
        return self._coders[device]

    def payload_nbytes(self, num_tokens: int) -> int:
        """Bytes of quantized K and V before DEFLATE for ``num_tokens`` tokens."""
        return payload_nbytes(self.artifact.keys.allocation, num_tokens) + payload_nbytes(
            self.artifact.values.allocation, num_tokens
        )

    def max_blob_nbytes(self, num_tokens: int) -> int:
        """Upper bound of an encoded blob's size (DEFLATE worst case: stored blocks)."""
        raw = self.payload_nbytes(num_tokens)
        n_chunks = max(1, -(-raw // self.chunk_bytes))
        deflate_bound = raw + 5 * (raw // 16383 + 1) * n_chunks + 8 * n_chunks
        return header_nbytes(num_tokens, n_chunks, explicit_positions=True) + deflate_bound

    def transform(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys without RoPE and values, centred and projected (torch): ``([T, R_k], [T, R_v])`` float32."""
        return self._torch(k.device).transform(k, v, positions)

    def inverse_transform(
        self, ck: torch.Tensor, cv: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, R]`` coefficients -> K (RoPE re-applied at ``positions``) and V, ``[L, T, H, D]`` ``dtype``."""
        return self._torch(ck.device).inverse_transform(ck, cv, positions, dtype)

    def quantize(self, ck: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
        """Coefficients -> the raw (pre-DEFLATE) payload ``[payload_nbytes(T)]`` uint8: K then V (torch)."""
        return self._torch(ck.device).quantize(ck, cv)

    def dequantize(self, payload: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`quantize`: ``([T, R_k], [T, R_v])`` float32."""
        return self._torch(payload.device).dequantize(payload, num_tokens)

    def encode(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Encode one segment.

        Args:
            k: ``[L, T, H, D]`` keys with RoPE applied (as stored in the KV pool), fp16/bf16/fp32.
            v: ``[L, T, H, D]`` values, same dtype and device.
            positions: ``[T]`` integer absolute positions of the tokens (their depth in the sequence).

        Returns:
            The blob, ``[n]`` uint8 on ``k.device``, ``n <= max_blob_nbytes(T)``.
        """
        check_kv(self.spec, k, v, positions)
        payload = self.payload_backend(k.device).encode(k, v, positions)  # [payload_nbytes(T)] uint8
        return self._wrap_many([payload], [positions], k.dtype)[0]

    def encode_rows(
        self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor], slots: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Encode the rows ``slots`` of per-layer KV-pool buffers (SGLang's ``k_buffer``/``v_buffer``).

        Args:
            k_layers, v_layers: ``L`` tensors ``[N, H, D]`` each (post-RoPE keys, values), one dtype and device.
            slots: ``[T]`` integer rows to encode.
            positions: ``[T]`` their absolute positions.

        Returns:
            The blob, ``[n]`` uint8 on the buffers' device. The Triton backend reads the rows in place.
        """
        return self.encode_rows_many(k_layers, v_layers, [(slots, positions)])[0]

    def encode_rows_many(
        self,
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        segments: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> list[torch.Tensor]:
        """:meth:`encode_rows` for several ``(slots [T_i], positions [T_i])`` segments of one pool.

        The DEFLATE chunks of all segments go through the entropy coder in one batched call (one nvCOMP
        launch for every node an eviction compresses); each segment still gets its own blob.
        """
        check_layers(self.spec, k_layers, v_layers)
        backend = self.payload_backend(k_layers[0].device)
        payloads = []
        for slots, positions in segments:
            if slots.dim() != 1 or slots.dtype.is_floating_point:
                raise ValueError(f"slots must be a 1-D integer tensor, got {slots.dtype} {list(slots.shape)}")
            check_positions(positions, slots.numel())
            payloads.append(backend.encode_rows(k_layers, v_layers, slots, positions))
        return self._wrap_many(payloads, [pos for _, pos in segments], k_layers[0].dtype)

    def _wrap_many(
        self, payloads: list[torch.Tensor], positions: list[torch.Tensor], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Entropy-code payloads (one batched call) and prepend each one's header: blobs on the payloads' device."""
        if not payloads:
            return []
        s = self.spec
        shape = (s.num_layers, s.num_kv_heads, s.head_dim)
        coder = self._coder(payloads[0].device)
        return wrap_payloads(
            coder, payloads, positions, dtype=dtype, chunk_bytes=self.chunk_bytes, artifact_id=self.artifact_id,
            shape=shape,
        )

    def read_header(self, blob: torch.Tensor | bytes) -> BlobHeader:
        """Validate a blob's header against this codec's calibration (no decoding; copies only the header)."""
        s = self.spec
        return checked_header(blob, self.artifact_id, (s.num_layers, s.num_kv_heads, s.head_dim), "calibration")

    def _unwrap_many(
        self, blobs: list[torch.Tensor], headers: list[BlobHeader], device: torch.device
    ) -> list[torch.Tensor]:
        """Verify and inflate blobs whose headers are read: raw payloads on ``device`` (see :func:`unwrap_payloads`)."""
        return unwrap_payloads(self._coder(device), blobs, headers, device, self.payload_nbytes)

    def payload_of(self, blob: torch.Tensor | bytes) -> torch.Tensor:
        """A verified blob's raw (pre-DEFLATE) payload ``[payload_nbytes(T)]`` uint8 on the blob's device."""
        src = _as_tensor(blob)
        return self._unwrap_many([src], self._headers([src]), src.device)[0]

    def _headers(self, blobs: list[torch.Tensor]) -> list[BlobHeader]:
        return headers_of(self.read_header, blobs)

    def decode(
        self, blob: torch.Tensor | bytes, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode a blob into ``(k, v, positions)``: ``[L, T, H, D]`` in the encoded dtype, ``[T]`` int64.

        Raises a :class:`~kvtc_sglang.codec.errors.BlobError` subclass for any truncated, corrupted,
        foreign or newer-version blob; never returns partially decoded data.
        """
        if device is None:
            device = blob.device if isinstance(blob, torch.Tensor) else torch.device("cpu")
        src = _as_tensor(blob)
        [header] = self._headers([src])
        [payload] = self._unwrap_many([src], [header], device)
        k, v = self.payload_backend(device).decode(payload, header.positions, header.dtype)
        return k, v, header.positions.to(device)

    def decode_rows(
        self,
        blob: torch.Tensor | bytes,
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Decode a blob straight into the rows ``slots`` of per-layer KV-pool buffers (see
        :meth:`decode_rows_many`)."""
        self.decode_rows_many([blob], k_layers, v_layers, [(slots, positions)])

    def decode_rows_many(
        self,
        blobs: Sequence[torch.Tensor | bytes],
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        targets: list[tuple[torch.Tensor, torch.Tensor]],
        headers: list[BlobHeader] | None = None,
    ) -> None:
        """Decode several blobs straight into pool rows, one ``(slots [T_i], positions [T_i])`` target each.

        ``positions`` must equal each blob's (else :class:`~.errors.BlobPositionsError`); the blobs' dtype
        must equal the buffers'. Every check of every blob (headers, CRC32s, positions, dtype) runs before the
        first row is written, and the DEFLATE chunks of all blobs go through one entropy call (one nvCOMP
        launch on a GPU). A bad blob raises a :class:`~kvtc_sglang.codec.errors.BlobError` whose
        ``blob_index`` names it, and leaves the buffers untouched.

        ``headers``: the blobs' headers as the caller keeps them on the host (from :meth:`read_header` when
        the blob was made); the copies of the headers to the host are then skipped. The chunk CRCs are
        checked either way.
        """
        check_layers(self.spec, k_layers, v_layers)
        srcs = [_as_tensor(b) for b in blobs]
        heads = self._headers(srcs) if headers is None else headers
        payloads = self.read_blobs(srcs, heads, targets, k_layers[0].device)
        self.write_rows_many(payloads, heads, k_layers, v_layers, targets)

    def read_blobs(
        self,
        blobs: Sequence[torch.Tensor | bytes],
        headers: list[BlobHeader],
        targets: list[tuple[torch.Tensor, torch.Tensor]],
        device: torch.device,
    ) -> list[torch.Tensor]:
        """The first half of :meth:`decode_rows_many`: every check of every blob against its header and target
        (positions, token count, CRC32s) and the inflate; raw payloads ``[payload_nbytes(T_i)]`` uint8 on
        ``device``. Touches no pool row: on a GPU it needs only the blobs' bytes to be ready. Raises a
        ``BlobError`` whose ``blob_index`` names the bad blob."""
        if len(targets) != len(blobs) or len(headers) != len(blobs):
            raise ValueError(f"{len(blobs)} blobs need as many targets and headers, got {len(targets)} targets")
        srcs = [_as_tensor(b) for b in blobs]
        for i, (header, (slots, positions)) in enumerate(zip(headers, targets, strict=True)):
            if not torch.equal(header.positions.cpu(), positions.cpu().to(header.positions.dtype)):
                raise BlobPositionsError(
                    f"blob positions {header.positions[:1].tolist()}.. differ from {positions[:1].tolist()}.."
                ).at(i)
            if slots.numel() != header.num_tokens:
                raise ValueError(
                    f"blob holds {header.num_tokens} tokens, destination is {slots.numel()} rows "
                    f"(blob {i} of {len(blobs)})"
                )
        return self._unwrap_many(srcs, headers, device)

    def write_rows_many(
        self,
        payloads: list[torch.Tensor],
        headers: list[BlobHeader],
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        targets: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """The second half of :meth:`decode_rows_many`: payloads from :meth:`read_blobs` into the pool rows
        ``targets[i][0]``, in the buffers' dtype (which must be the blobs'). On CUDA: kernel launches and
        asynchronous copies from pinned memory only, no host sync."""
        check_layers(self.spec, k_layers, v_layers)
        for i, header in enumerate(headers):
            if header.dtype != k_layers[0].dtype:
                raise ValueError(
                    f"blob {i} of {len(headers)} holds {header.dtype} tokens, the pool is {k_layers[0].dtype}"
                )
        backend = self.payload_backend(k_layers[0].device)
        for payload, header, (slots, _) in zip(payloads, headers, targets, strict=True):
            backend.decode_rows(payload, k_layers, v_layers, slots, header.positions)
