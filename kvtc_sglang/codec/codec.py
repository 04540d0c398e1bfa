"""KVTC transform coder: RoPE removal, cross-layer PCA, DP-allocated quantization, DEFLATE.

Plan once (``KVTCCodec(artifact)`` moves the basis to each device on first use), run many
(``encode`` / ``decode``, or ``encode_rows`` / ``decode_rows`` straight from and into per-layer KV-pool
buffers). Sinks and the recent window are the caller's concern: the codec encodes exactly the tokens it
is given.

Kernels: CUDA tensors go through the fused Triton kernels (:mod:`kvtc_sglang.triton_kernels`), CPU
tensors through plain torch; both write the same payload format, and for the same coefficients the same
bytes. ``kernels="triton"`` forces the Triton path (on the CPU only under ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import zlib

import torch

from .artifact import CalibrationArtifact, StreamCalibration
from .blob import BlobHeader, build_header, header_nbytes, parse_header, verify_chunks
from .entropy import EntropyCoder, default_entropy_coder
from .errors import BlobCalibrationMismatchError, BlobChecksumError
from .quant import decode_coefficients, encode_coefficients, payload_nbytes
from .rope import apply_rope, remove_rope
from .rows import RowsMixin

DEFAULT_CHUNK_BYTES = 1 << 16
KERNELS = ("auto", "torch", "triton")
# tl.dot input precision of the Triton projections: "ieee" is exact fp32 (FMA units); "tf32x3" (about
# fp32 accuracy) and "tf32" (10-bit mantissa products) run on tensor cores. The interpreter computes fp32.
DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")


class _DeviceStream:
    """One stream's calibration tensors on one device."""

    def __init__(self, cal: StreamCalibration, device: torch.device) -> None:
        self.mean = cal.mean.to(device)  # [F]
        self.scale = cal.scale.to(device)  # [F]
        self.enc_basis = (cal.basis / cal.scale[:, None]).to(device)  # [F, R]: normalise, then project
        self.dec_basis = (cal.basis * cal.scale[:, None]).t().contiguous().to(device)  # [R, F]
        self.rank = cal.basis.shape[1]
        self.fp8_scale = cal.fp8_scale.to(device)  # [R]
        self.alloc = cal.allocation
        self._plan = None

    @property
    def plan(self):  # noqa: ANN201 (StreamPlan; imported lazily, the torch path never needs Triton)
        if self._plan is None:
            from ..triton_kernels.plan import StreamPlan  # noqa: PLC0415

            self._plan = StreamPlan.build(self.alloc, self.mean.device)
        return self._plan


class KVTCCodec(RowsMixin):
    """Encode ``[L, T, H, D]`` K/V into one blob and back.

    Args:
        artifact: calibration for this model (PCA bases, bit allocations, RoPE settings).
        entropy: lossless stage; default: nvCOMP for CUDA tensors, zlib for CPU tensors.
        chunk_bytes: raw payload bytes per DEFLATE chunk (each chunk has its own length and CRC32).
        kernels: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"torch"`` or ``"triton"``.
        dot_precision: the Triton projections' ``tl.dot`` precision: ``"ieee"`` (exact fp32, default),
            ``"tf32x3"`` or ``"tf32"`` (tensor cores; faster, less exact).
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
        self.kernels = kernels
        if dot_precision not in DOT_PRECISIONS:
            raise ValueError(f"dot_precision must be one of {DOT_PRECISIONS}, got {dot_precision!r}")
        self.dot_precision = dot_precision
        self.artifact = artifact
        self.spec = artifact.spec
        self.artifact_id = artifact.artifact_id
        self.chunk_bytes = chunk_bytes
        self._entropy = entropy
        self._devices: dict[torch.device, tuple[_DeviceStream, _DeviceStream]] = {}

    def _streams(self, device: torch.device) -> tuple[_DeviceStream, _DeviceStream]:
        if device not in self._devices:
            self._devices[device] = (
                _DeviceStream(self.artifact.keys, device),
                _DeviceStream(self.artifact.values, device),
            )
        return self._devices[device]

    def uses_triton(self, device: torch.device) -> bool:
        """Whether tensors on ``device`` go through the Triton kernels."""
        return self.kernels == "triton" or (self.kernels == "auto" and device.type == "cuda")

    def _coder(self, device: torch.device) -> EntropyCoder:
        return self._entropy if self._entropy is not None else default_entropy_coder(device)

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

    def _check_kv(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        s = self.spec
        want = (s.num_layers, k.shape[1] if k.dim() == 4 else -1, s.num_kv_heads, s.head_dim)
        for name, t in (("k", k), ("v", v)):
            if t.dim() != 4 or tuple(t.shape) != want:
                raise ValueError(f"{name} must be [L, T, H, D] = {list(want)}, got {list(t.shape)}")
            if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
            raise ValueError(f"k and v must match: {k.shape}/{k.dtype}/{k.device} vs {v.shape}/{v.dtype}/{v.device}")
        self._check_positions(positions, k.shape[1])

    def transform(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys without RoPE and values, centred and projected: ``([T, R_k], [T, R_v])`` float32."""
        sk, sv = self._streams(k.device)
        num_t = k.shape[1]
        k_un = remove_rope(k, positions.to(k.device), self.spec.ropes)  # [L, T, H, D] float32
        xk = k_un.permute(1, 0, 2, 3).reshape(num_t, -1)  # [T, F = L*H*D]
        xv = v.to(torch.float32).permute(1, 0, 2, 3).reshape(num_t, -1)  # [T, F]
        return (xk - sk.mean) @ sk.enc_basis, (xv - sv.mean) @ sv.enc_basis

    def inverse_transform(
        self, ck: torch.Tensor, cv: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, R]`` coefficients -> K (RoPE re-applied at ``positions``) and V, ``[L, T, H, D]`` ``dtype``."""
        sk, sv = self._streams(ck.device)
        s = self.spec
        num_t = ck.shape[0]
        xk = ck @ sk.dec_basis + sk.mean  # [T, F]
        xv = cv @ sv.dec_basis + sv.mean  # [T, F]
        k_un = xk.reshape(num_t, s.num_layers, s.num_kv_heads, s.head_dim).permute(1, 0, 2, 3)  # [L, T, H, D]
        v = xv.reshape(num_t, s.num_layers, s.num_kv_heads, s.head_dim).permute(1, 0, 2, 3)
        k = apply_rope(k_un, positions.to(ck.device), s.ropes)
        return k.to(dtype).contiguous(), v.to(dtype).contiguous()

    def quantize(self, ck: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
        """Coefficients -> the raw (pre-DEFLATE) payload ``[payload_nbytes(T)]`` uint8: K then V."""
        sk, sv = self._streams(ck.device)
        return torch.cat(
            [encode_coefficients(ck, sk.alloc, sk.fp8_scale), encode_coefficients(cv, sv.alloc, sv.fp8_scale)]
        )

    def dequantize(self, payload: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`quantize`: ``([T, R_k], [T, R_v])`` float32."""
        sk, sv = self._streams(payload.device)
        nk = payload_nbytes(sk.alloc, num_tokens)
        ck = decode_coefficients(payload[:nk], sk.alloc, sk.fp8_scale, num_tokens, sk.rank)
        cv = decode_coefficients(payload[nk:], sv.alloc, sv.fp8_scale, num_tokens, sv.rank)
        return ck, cv

    def encode(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Encode one segment.

        Args:
            k: ``[L, T, H, D]`` keys with RoPE applied (as stored in the KV pool), fp16/bf16/fp32.
            v: ``[L, T, H, D]`` values, same dtype and device.
            positions: ``[T]`` integer absolute positions of the tokens (their depth in the sequence).

        Returns:
            The blob, ``[n]`` uint8 on ``k.device``, ``n <= max_blob_nbytes(T)``.
        """
        self._check_kv(k, v, positions)
        if self.uses_triton(k.device):
            slots = torch.arange(k.shape[1], device=k.device)
            k_layers, v_layers = list(k.contiguous().unbind(0)), list(v.contiguous().unbind(0))  # L x [T, H, D]
            payload = self._payload_triton(k_layers, v_layers, slots, positions)
        else:
            payload = self.quantize(*self.transform(k, v, positions))  # [raw] uint8
        return self._wrap(payload, positions, k.dtype)

    def _wrap(self, payload: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._wrap_many([payload], [positions], dtype)[0]

    def _wrap_many(
        self, payloads: list[torch.Tensor], positions: list[torch.Tensor], dtype: torch.dtype
    ) -> list[torch.Tensor]:
        """Entropy-code payloads (one batched call) and prepend each one's header: blobs on the payloads' device."""
        if not payloads:
            return []
        chunked = [list(torch.split(p, self.chunk_bytes)) if p.numel() else [] for p in payloads]
        flat = self._coder(payloads[0].device).compress([c for chunks in chunked for c in chunks])
        s = self.spec
        blobs, at = [], 0
        for payload, chunks, pos in zip(payloads, chunked, positions, strict=True):
            comp = flat[at : at + len(chunks)]
            at += len(chunks)
            table = [
                (c.numel(), r.numel(), zlib.crc32(c.cpu().numpy().tobytes())) for c, r in zip(comp, chunks, strict=True)
            ]
            header = build_header(self.artifact_id, (s.num_layers, s.num_kv_heads, s.head_dim), dtype, pos, table)
            head = torch.frombuffer(bytearray(header), dtype=torch.uint8).to(payload.device)
            blobs.append(torch.cat([head, *comp]))
        return blobs

    def read_header(self, blob: torch.Tensor | bytes) -> BlobHeader:
        """Validate a blob's header against this codec's calibration (no decoding)."""
        data = bytes(blob) if isinstance(blob, (bytes, bytearray)) else blob.cpu().numpy().tobytes()
        header = parse_header(data, self.artifact_id)
        s = self.spec
        if (header.num_layers, header.num_heads, header.head_dim) != (s.num_layers, s.num_kv_heads, s.head_dim):
            raise BlobCalibrationMismatchError(
                f"blob shape L,H,D = {header.num_layers},{header.num_heads},{header.head_dim}, "
                f"calibration has {s.num_layers},{s.num_kv_heads},{s.head_dim}"
            )
        return header

    def _unwrap(self, blob: torch.Tensor | bytes, device: torch.device) -> tuple[BlobHeader, torch.Tensor]:
        """Verify a blob (header, chunk lengths and CRC32s) and inflate it: ``(header, payload [raw] uint8)``."""
        data = bytes(blob) if isinstance(blob, (bytes, bytearray)) else blob.cpu().numpy().tobytes()
        header = self.read_header(data)
        num_t = header.num_tokens
        if sum(c[1] for c in header.chunks) != self.payload_nbytes(num_t):
            raise BlobChecksumError(
                f"chunk table holds {sum(c[1] for c in header.chunks)} raw bytes, "
                f"{num_t} tokens need {self.payload_nbytes(num_t)}"
            )
        spans = verify_chunks(data, header)
        src = (
            blob
            if isinstance(blob, torch.Tensor) and blob.device == device
            else torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
        )
        comp = [src[off : off + n] for off, n in spans]
        raw = self._coder(device).decompress(comp, [c[1] for c in header.chunks])
        payload = torch.cat(raw) if raw else torch.empty(0, dtype=torch.uint8, device=device)
        return header, payload

    def decode(
        self, blob: torch.Tensor | bytes, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode a blob into ``(k, v, positions)``: ``[L, T, H, D]`` in the encoded dtype, ``[T]`` int64.

        Raises a :class:`~kvtc_sglang.codec.errors.BlobError` subclass for any truncated, corrupted,
        foreign or newer-version blob; never returns partially decoded data.
        """
        if device is None:
            device = blob.device if isinstance(blob, torch.Tensor) else torch.device("cpu")
        header, payload = self._unwrap(blob, device)
        if self.uses_triton(device):
            s, num_t = self.spec, header.num_tokens
            k = torch.empty(s.num_layers, num_t, s.num_kv_heads, s.head_dim, dtype=header.dtype, device=device)
            v = torch.empty_like(k)
            slots = torch.arange(num_t, device=device)
            self._decode_triton(payload, list(k.unbind(0)), list(v.unbind(0)), slots, header.positions)
        else:
            k, v = self.inverse_transform(*self.dequantize(payload, header.num_tokens), header.positions, header.dtype)
        return k, v, header.positions.to(device)
