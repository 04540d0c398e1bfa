"""Host-to-device copies that never make the host wait (imports nothing from the package).

A plain ``tensor.to("cuda")`` of pageable host memory is a blocking copy: the host waits for the current stream,
and on a kvtc stream that has waited on SGLang's forward stream, that is the forward in flight. Staging the
bytes in pinned memory makes the copy asynchronous; torch's caching host allocator keeps the pinned block
until the copy has run (it records an event on the copying stream).
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` on ``device``: from the host to a CUDA device through pinned memory with ``non_blocking=True``
    (ordered on the current stream, no host wait); anything else as ``t.to(device)`` (on the CPU: ``t``)."""
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def tensor_on(values: list[int] | list[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype=dtype)`` on ``device`` without a blocking copy (see :func:`to_device`)."""
    return to_device(torch.tensor(values, dtype=dtype), device)
