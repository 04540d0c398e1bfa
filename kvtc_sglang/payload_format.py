"""The payload format shared by the codec and the Triton kernels: group kinds and byte sizes.

Both :mod:`kvtc_sglang.codec` (torch path, artifact format) and :mod:`kvtc_sglang.triton_kernels`
(compiled path) read and write this format, and neither may import the other, so its vocabulary lives
here, importing nothing from the package. :class:`GroupKind` is a ``StrEnum``: its values are the
strings the calibration artifact stores (``GroupKind.INT4 == "int4"``), and :attr:`GroupKind.code` is
the integer the kernels' group tables hold.

Payload of one stream (K or V) for ``T`` tokens, groups in allocation order:

* integer group of ``s`` components, ``b`` bits: ``min`` fp16 ``[T]``, ``step`` fp16 ``[T]``, then the
  codes component-major (``[s, T]``), each component's row of ``T`` codes packed little-endian, ``8 / b``
  codes per byte, zero-padded to a whole byte (:func:`row_nbytes`);
* fp8 group: float8 e4m3 bytes component-major ``[s, T]``;
* drop: nothing.
"""

from __future__ import annotations

from enum import StrEnum

FP8_MAX = 448.0  # largest finite float8 e4m3fn value (torch.finfo(torch.float8_e4m3fn).max)
FP16_MAX = 65504.0  # largest finite float16 value: integer groups' min and step are clamped to it
INT_OVERHEAD_BITS = 32  # fp16 minimum + fp16 step per token per integer group


class GroupKind(StrEnum):
    """How one group of principal components is coded."""

    DROP = "drop"
    INT2 = "int2"
    INT4 = "int4"
    INT8 = "int8"
    FP8 = "fp8"

    @property
    def bits(self) -> int:
        """Bits per component per token (0 for ``drop``)."""
        return _BITS[self]

    @property
    def is_int(self) -> bool:
        """Uniform asymmetric integer quantization with a per-token fp16 min and step."""
        return self in (GroupKind.INT2, GroupKind.INT4, GroupKind.INT8)

    @property
    def code(self) -> int:
        """The integer the kernels' group tables store for this kind (its index in declaration order)."""
        return list(GroupKind).index(self)


_BITS = {GroupKind.DROP: 0, GroupKind.INT2: 2, GroupKind.INT4: 4, GroupKind.INT8: 8, GroupKind.FP8: 8}


def row_nbytes(num_tokens: int, bits: int) -> int:
    """Bytes of one component's packed row of ``num_tokens`` codes of ``bits`` bits."""
    return (num_tokens * bits + 7) // 8


def group_nbytes(size: int, kind: GroupKind | str, num_tokens: int) -> int:
    """Bytes one group of ``size`` components coded as ``kind`` takes in the payload for ``num_tokens`` tokens."""
    kind = GroupKind(kind)
    if kind.is_int:
        return 4 * num_tokens + size * row_nbytes(num_tokens, kind.bits)
    if kind is GroupKind.FP8:
        return size * num_tokens
    return 0
