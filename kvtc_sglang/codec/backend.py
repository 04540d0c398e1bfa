"""The payload backend seam: the one place where the codec's torch and Triton paths differ.

A payload backend turns the K/V of one segment into its raw (pre-DEFLATE) payload and back: coefficients
(RoPE removal, centring, projection) and packed codes (quantization, bit-packing), both streams. The
codec picks one per device, once (:meth:`~.codec.KVTCCodec.payload_backend`): :class:`TorchBackend`
here, or :class:`~.backend_triton.TritonBackend`, which drives :mod:`kvtc_sglang.triton_kernels`. Everything
around it (validation, DEFLATE, headers, CRCs) is shared, so both write the same blob format.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from .artifact import CalibrationArtifact, StreamCalibration
from .quant import decode_coefficients, encode_coefficients, payload_nbytes
from .rope import apply_rope, remove_rope
from .spec import ModelSpec


@dataclass(frozen=True)
class DeviceStream:
    """One stream's calibration tensors on one device (fp32)."""

    cal: StreamCalibration
    mean: torch.Tensor  # [F]
    enc_basis: torch.Tensor  # [F, R]: normalise by the per-feature scale, then project
    dec_basis: torch.Tensor  # [R, F]: project back, then undo the scale
    fp8_scale: torch.Tensor  # [R]

    @classmethod
    def build(cls, cal: StreamCalibration, device: torch.device) -> DeviceStream:
        return cls(
            cal=cal,
            mean=cal.mean.to(device),
            enc_basis=(cal.basis / cal.scale[:, None]).to(device),
            dec_basis=(cal.basis * cal.scale[:, None]).t().contiguous().to(device),
            fp8_scale=cal.fp8_scale.to(device),
        )

    @property
    def rank(self) -> int:
        return self.enc_basis.shape[1]

    def nbytes(self, num_tokens: int) -> int:
        """This stream's payload bytes for ``num_tokens`` tokens."""
        return payload_nbytes(self.cal.allocation, num_tokens)


@dataclass(frozen=True)
class DeviceStreams:
    """Both streams of a calibration on one device."""

    keys: DeviceStream
    values: DeviceStream

    @classmethod
    def build(cls, artifact: CalibrationArtifact, device: torch.device) -> DeviceStreams:
        return cls(DeviceStream.build(artifact.keys, device), DeviceStream.build(artifact.values, device))


class PayloadBackend(Protocol):
    """Both streams of one segment between K/V and the raw payload ``[nbytes_k + nbytes_v]`` uint8.

    Inputs are validated by the codec before a backend sees them. ``k_layers``/``v_layers`` are SGLang's
    per-layer pool buffers, ``L x [N, H, D]``; ``slots [T]`` and ``positions [T]`` are integer tensors.
    """

    def encode(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``[L, T, H, D]`` K (RoPE applied) and V -> payload."""
        ...

    def decode(
        self, payload: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Payload of ``T = positions.numel()`` tokens -> K (RoPE re-applied) and V ``[L, T, H, D]`` ``dtype``."""
        ...

    def encode_rows(
        self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor], slots: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """The pool rows ``slots`` -> payload."""
        ...

    def decode_rows(
        self,
        payload: torch.Tensor,
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Payload -> the pool rows ``slots``, in the buffers' dtype."""
        ...


def decode_by_rows(
    backend: PayloadBackend, spec: ModelSpec, payload: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A backend's ``decode`` through its ``decode_rows``: K (RoPE re-applied) and V ``[L, T, H, D]`` ``dtype``,
    new tensors on the payload's device, ``T = positions.numel()``."""
    num_t = positions.numel()
    k = torch.empty(spec.num_layers, num_t, spec.num_kv_heads, spec.head_dim, dtype=dtype, device=payload.device)
    v = torch.empty_like(k)  # [L, T, H, D] each
    backend.decode_rows(payload, list(k.unbind(0)), list(v.unbind(0)), torch.arange(num_t, device=k.device), positions)
    return k, v


TORCH_DOT_PRECISIONS = ("ieee", "bf16")
# Most tokens per transform pass of the torch backend: the [C, F] fp32 features of a chunk stay cache-sized.
# Measured here (2 cores, bf16 projections, SmolLM2 r16): a 2-4k-token encode in one pass 0.093-0.109 ms/token,
# in 512-token chunks 0.063-0.066. Each token's coefficients depend on that token only (up to the GEMM's
# rounding, which may differ with the number of rows).
CHUNK_TOKENS = 512


def chunks(num_t: int, most: int = CHUNK_TOKENS) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges covering ``num_t`` tokens in as few near-equal chunks of at most ``most`` as possible
    (no 1-token tail: 513 tokens are 257 + 256); none for no tokens."""
    if num_t <= 0:
        return []
    n = -(-num_t // most)
    size = -(-num_t // n)
    return [(lo, min(num_t, lo + size)) for lo in range(0, num_t, size)]


def check_torch_dot_precision(precision: str) -> str:
    """``precision`` if the torch backend supports it (:data:`TORCH_DOT_PRECISIONS`), else ``ValueError``."""
    if precision not in TORCH_DOT_PRECISIONS:
        raise ValueError(f"the torch backend's dot_precision must be one of {TORCH_DOT_PRECISIONS}, got {precision!r}")
    return precision


class TorchBackend:
    """Plain torch on any device: ``[T, F]`` features, matmuls, :mod:`.quant`'s quantizer.

    ``precision``: the two projections' inputs, ``"ieee"`` (fp32, the reference) or ``"bf16"`` (bf16 features,
    coefficients and bases, fp32 accumulation in the GEMM: about 4x faster on CPUs with AVX512-BF16 or AMX,
    relative error ~3e-3 on the coefficients, far below what their quantization adds). Centring, RoPE and the
    quantizer stay fp32 either way.
    """

    def __init__(self, spec: ModelSpec, streams: DeviceStreams, precision: str = "ieee") -> None:
        self.spec = spec
        self.streams = streams
        self.precision = check_torch_dot_precision(precision)
        # bf16 copies of the bases made once (plan once, run many); None on the fp32 path
        self._low = None
        if precision == "bf16":
            self._low = tuple((s.enc_basis.to(torch.bfloat16), s.dec_basis.to(torch.bfloat16))
                              for s in (streams.keys, streams.values))

    def _project(self, x: torch.Tensor, stream: int, encode: bool) -> torch.Tensor:
        """``x [T, F]`` (encode: centred features) @ enc basis ``[F, R]``, or ``x [T, R]`` @ dec basis
        ``[R, F]``; float32 out."""
        if self._low is None:
            s = (self.streams.keys, self.streams.values)[stream]
            return x @ (s.enc_basis if encode else s.dec_basis)
        basis = self._low[stream][0 if encode else 1]
        return (x.to(torch.bfloat16) @ basis).to(torch.float32)

    def transform(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys without RoPE and values, centred and projected: ``([T, R_k], [T, R_v])`` float32."""
        sk, sv = self.streams.keys, self.streams.values
        num_t = k.shape[1]
        # RoPE removal writes the [T, L, H, D] layout directly: no transpose pass, centred in place
        xk = remove_rope(k, positions.to(k.device), self.spec.ropes, tokens_first=True).view(num_t, -1)  # [T, F]
        xv = v.permute(1, 0, 2, 3).reshape(num_t, -1)  # [T, F] in the pool's dtype (one copy)
        return self._project(xk.sub_(sk.mean), 0, True), self._project(xv - sv.mean, 1, True)  # [T, R_k], [T, R_v]

    def inverse_tokens_first(
        self, ck: torch.Tensor, cv: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, R]`` coefficients -> K (RoPE re-applied at ``positions``) and V, ``[T, L, H, D]`` ``dtype``,
        contiguous (the layout of the projection's output: ``k[:, l]`` is layer ``l``'s ``[T, H, D]``)."""
        sk, sv = self.streams.keys, self.streams.values
        s = self.spec
        num_t = ck.shape[0]
        shape = (num_t, s.num_layers, s.num_kv_heads, s.head_dim)
        xk = self._project(ck, 0, False).add_(sk.mean).view(shape)  # [T, F] -> [T, L, H, D]
        xv = self._project(cv, 1, False).add_(sv.mean).view(shape)  # [T, F] -> [T, L, H, D]
        k = apply_rope(xk.permute(1, 0, 2, 3), positions.to(ck.device), s.ropes, tokens_first=True)  # [T, L, H, D]
        return k.to(dtype), xv.to(dtype)

    def inverse_transform(
        self, ck: torch.Tensor, cv: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[T, R]`` coefficients -> K (RoPE re-applied at ``positions``) and V, ``[L, T, H, D]`` ``dtype``."""
        k, v = self.inverse_tokens_first(ck, cv, positions, dtype)  # [T, L, H, D] each
        return k.permute(1, 0, 2, 3).contiguous(), v.permute(1, 0, 2, 3).contiguous()

    def quantize(self, ck: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
        """Coefficients -> the raw payload ``[nbytes_k + nbytes_v]`` uint8: K then V."""
        sk, sv = self.streams.keys, self.streams.values
        return torch.cat(
            [
                encode_coefficients(ck, sk.cal.allocation, sk.fp8_scale),
                encode_coefficients(cv, sv.cal.allocation, sv.fp8_scale),
            ]
        )

    def dequantize(self, payload: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`quantize`: ``([T, R_k], [T, R_v])`` float32."""
        sk, sv = self.streams.keys, self.streams.values
        nk = sk.nbytes(num_tokens)
        ck = decode_coefficients(payload[:nk], sk.cal.allocation, sk.fp8_scale, num_tokens, sk.rank)
        cv = decode_coefficients(payload[nk:], sv.cal.allocation, sv.fp8_scale, num_tokens, sv.rank)
        return ck, cv

    def _coefficients(
        self, num_t: int, rows: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]], positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`transform` of ``num_t`` tokens in :func:`chunks`: ``rows(lo, hi)`` gives tokens ``[lo, hi)`` as
        ``[L, hi - lo, H, D]`` K and V. Returns ``([T, R_k], [T, R_v])`` float32: one pass's values up to the
        GEMM's rounding."""
        sk, sv = self.streams.keys, self.streams.values
        device = sk.mean.device
        ck = torch.empty(num_t, sk.rank, dtype=torch.float32, device=device)  # [T, R_k]
        cv = torch.empty(num_t, sv.rank, dtype=torch.float32, device=device)  # [T, R_v]
        for lo, hi in chunks(num_t):
            ck[lo:hi], cv[lo:hi] = self.transform(*rows(lo, hi), positions[lo:hi])
        return ck, cv

    def encode(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        coeffs = self._coefficients(k.shape[1], lambda lo, hi: (k[:, lo:hi], v[:, lo:hi]), positions)
        return self.quantize(*coeffs)

    def decode(
        self, payload: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return decode_by_rows(self, self.spec, payload, positions, dtype)

    def coefficients_rows(
        self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor], slots: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pool rows ``slots [T]`` at ``positions [T]`` transformed (in :func:`chunks`): ``([T, R_k], [T, R_v])``
        float32."""
        idx = slots.to(k_layers[0].device)

        def rows(lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
            part = idx[lo:hi]
            k = torch.stack([b.index_select(0, part) for b in k_layers])  # [L, C, H, D]
            v = torch.stack([b.index_select(0, part) for b in v_layers])  # [L, C, H, D]
            return k, v

        return self._coefficients(idx.numel(), rows, positions)

    def encode_rows(
        self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor], slots: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        return self.quantize(*self.coefficients_rows(k_layers, v_layers, slots, positions))

    def decode_rows(
        self,
        payload: torch.Tensor,
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Dequantize all tokens, then project back into the rows ``slots`` in :func:`chunks`."""
        ck, cv = self.dequantize(payload, positions.numel())  # [T, R_k], [T, R_v]
        self.write_coefficients((ck, cv), k_layers, v_layers, slots, positions)

    def write_coefficients(
        self,
        coeffs: tuple[torch.Tensor, torch.Tensor],
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """``([T, R_k], [T, R_v])`` coefficients projected back into the rows ``slots [T]`` (keys rotated at
        ``positions [T]``) in :func:`chunks`, in the buffers' dtype."""
        ck, cv = coeffs
        idx = slots.to(k_layers[0].device)
        for lo, hi in chunks(positions.numel()):
            k, v = self.inverse_tokens_first(ck[lo:hi], cv[lo:hi], positions[lo:hi], k_layers[0].dtype)  # [C, L, H, D]
            part = idx[lo:hi]
            for layer, (kb, vb) in enumerate(zip(k_layers, v_layers, strict=True)):
                kb.index_copy_(0, part, k[:, layer])
                vb.index_copy_(0, part, v[:, layer])
