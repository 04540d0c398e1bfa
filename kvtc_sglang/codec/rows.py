"""Encoding from and decoding into per-layer KV-pool buffers (mixin of :class:`~kvtc_sglang.codec.KVTCCodec`).

SGLang's ``MHATokenToKVPool`` keeps one ``[num_slots, H, D]`` K and V buffer per layer; a radix node is a
list of slot indices. On CUDA the fused Triton kernels read and write those rows in place; on the CPU
the rows are gathered (scattered) and the torch path runs.
"""

from __future__ import annotations

import torch

from .errors import BlobChecksumError


class RowsMixin:
    def encode_rows(
        self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor], slots: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        """Encode the rows ``slots`` of per-layer KV-pool buffers (SGLang's ``k_buffer``/``v_buffer``).

        Args:
            k_layers, v_layers: ``L`` tensors ``[N, H, D]`` each (post-RoPE keys, values), one dtype and device.
            slots: ``[T]`` integer rows to encode.
            positions: ``[T]`` their absolute positions.

        Returns:
            The blob, ``[n]`` uint8 on the buffers' device. The Triton path reads the rows in place.
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
        device = k_layers[0].device
        payloads = []
        for slots, positions in segments:
            if self.uses_triton(device):
                self._check_positions(positions, slots.numel())
                payloads.append(self._payload_triton(k_layers, v_layers, slots, positions))
                continue
            idx = slots.to(device)
            k = torch.stack([b.index_select(0, idx) for b in k_layers])  # [L, T, H, D]
            v = torch.stack([b.index_select(0, idx) for b in v_layers])  # [L, T, H, D]
            self._check_kv(k, v, positions)
            payloads.append(self.quantize(*self.transform(k, v, positions)))
        return self._wrap_many(payloads, [pos for _, pos in segments], k_layers[0].dtype)

    def _check_positions(self, positions: torch.Tensor, num_tokens: int) -> None:
        if positions.dim() != 1 or positions.numel() != num_tokens or positions.dtype.is_floating_point:
            raise ValueError(
                f"positions must be an integer [T={num_tokens}], got {positions.dtype} {list(positions.shape)}"
            )

    def _payload_triton(
        self, k_layers: list[torch.Tensor], v_layers: list[torch.Tensor], slots: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor:
        from ..triton_kernels.pipeline import encode_payload  # noqa: PLC0415 (optional path)

        streams = self._streams(k_layers[0].device)
        return encode_payload(self.spec, streams, k_layers, v_layers, slots, positions, self.dot_precision)

    def _decode_triton(
        self,
        payload: torch.Tensor,
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        from ..triton_kernels.pipeline import decode_payload  # noqa: PLC0415 (optional path)

        streams = self._streams(k_layers[0].device)
        decode_payload(self.spec, streams, payload, k_layers, v_layers, slots, positions, self.dot_precision)

    def decode_rows(
        self,
        blob: torch.Tensor | bytes,
        k_layers: list[torch.Tensor],
        v_layers: list[torch.Tensor],
        slots: torch.Tensor,
        positions: torch.Tensor,
    ) -> None:
        """Decode a blob straight into the rows ``slots`` of per-layer KV-pool buffers.

        ``positions [T]`` must equal the blob's; the blob's dtype must equal the buffers'. Every check
        (header, CRC32s, positions, dtype) runs before the first row is written, so a bad blob raises a
        :class:`~kvtc_sglang.codec.errors.BlobError` and leaves the buffers untouched.
        """
        device = k_layers[0].device
        header, payload = self._unwrap(blob, device)
        if not torch.equal(header.positions.cpu(), positions.cpu().to(header.positions.dtype)):
            raise BlobChecksumError(
                f"blob positions {header.positions[:1].tolist()}.. differ from {positions[:1].tolist()}.."
            )
        if header.dtype != k_layers[0].dtype or slots.numel() != header.num_tokens:
            raise ValueError(
                f"blob holds {header.num_tokens} {header.dtype} tokens, destination is {slots.numel()} rows of "
                f"{k_layers[0].dtype}"
            )
        if self.uses_triton(device):
            self._decode_triton(payload, k_layers, v_layers, slots, header.positions)
            return
        k, v = self.inverse_transform(*self.dequantize(payload, header.num_tokens), header.positions, header.dtype)
        idx = slots.to(device)
        for layer, (kb, vb) in enumerate(zip(k_layers, v_layers, strict=True)):
            kb.index_copy_(0, idx, k[layer])
            vb.index_copy_(0, idx, v[layer])
