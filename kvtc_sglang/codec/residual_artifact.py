"""Versioned residual calibration for joint encoding: the bit allocation and fp8 scales of residuals, fitted on
real text read after different histories, in the coefficient space of one *reference* calibration.

File layout: one ``.safetensors`` file whose ``__metadata__["kvtc"]`` is the JSON header (format
``kvtc-residual``); tensors ``keys.fp8_scale [R_k]`` and ``values.fp8_scale [R_v]`` float32 (``R``: the reference
calibration's ranks). The header names the reference calibration by its artifact id, so a residual calibration
is refused with any other; its own ``artifact_id`` (SHA-256 over tensors and header) is the calibration id every
residual blob carries. Never pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .allocation import Allocation
from .artifact import STREAMS, CalibrationArtifact, artifact_digest, read_json_header, write_artifact
from .errors import ArtifactError

FORMAT = "kvtc-residual"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ResidualCalibration:
    """Residual allocations for K and V against reference blobs of the calibration ``reference_id`` (hex).

    ``fp8_scale``: ``(K [R_k], V [R_v])`` float32; ``info``: what it was fitted on (tokens, pairs, ratio)."""

    model: str
    reference_id: str
    keys: Allocation
    values: Allocation
    fp8_scale: tuple[torch.Tensor, torch.Tensor]
    info: dict = field(default_factory=dict)

    def check_reference(self, reference: CalibrationArtifact) -> None:
        """``ArtifactError`` unless ``reference`` is the calibration these residuals were fitted against."""
        got = reference.artifact_id.hex()
        if not got.startswith(self.reference_id[:16]) or len(self.reference_id) < 16:
            raise ArtifactError(
                f"residual calibration was fitted against reference calibration {self.reference_id[:16]}, "
                f"got {got} ({reference.spec.name})"
            )
        for name, alloc, scale in zip(STREAMS, (self.keys, self.values), self.fp8_scale, strict=True):
            rank = getattr(reference, name).allocation.rank
            if alloc.rank > rank or scale.shape != (rank,):
                raise ArtifactError(
                    f"residual {name}: allocation rank {alloc.rank} and fp8 scale {list(scale.shape)} must fit the "
                    f"reference's rank {rank}"
                )

    @property
    def bits_per_token(self) -> int:
        return self.keys.bits_per_token + self.values.bits_per_token

    @property
    def artifact_id(self) -> bytes:
        """8-byte fingerprint stored in every residual blob."""
        return bytes.fromhex(artifact_digest(self._tensors(), self._header_body()))[:8]

    def _tensors(self) -> dict[str, torch.Tensor]:
        pairs = zip(STREAMS, self.fp8_scale, strict=True)
        return {f"{n}.fp8_scale": s.to(torch.float32).contiguous() for n, s in pairs}

    def _header_body(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "reference_id": self.reference_id,
            "allocation": {"keys": self.keys.to_json(), "values": self.values.to_json()},
            "bits_per_token": self.bits_per_token,
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        return write_artifact(path, self._tensors(), self._header_body())


def load_residual(path: str | Path) -> ResidualCalibration:
    """Load and verify a residual calibration (format, version, fingerprint)."""
    path = Path(path)
    header = read_json_header(path)
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format is {header.get('format')!r}, expected {FORMAT!r}")
    if header.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: residual format version {header.get('format_version')!r}, this kvtc-sglang reads "
            f"{FORMAT_VERSION}; fit it again"
        )
    try:
        allocs = [Allocation.from_json(header["allocation"][n]) for n in STREAMS]
        tensors = load_file(str(path))
        scales = (tensors["keys.fp8_scale"], tensors["values.fp8_scale"])
        cal = ResidualCalibration(str(header["model"]), str(header["reference_id"]), allocs[0], allocs[1], scales,
                                  dict(header.get("info", {})))
        stored = header["artifact_id"]
    except (KeyError, TypeError, ValueError, SafetensorError, OSError) as e:
        raise ArtifactError(f"{path}: residual calibration field missing or invalid: {e}") from e
    if artifact_digest(cal._tensors(), cal._header_body()) != stored:
        raise ArtifactError(f"{path}: artifact_id does not match its contents (file modified or corrupted)")
    return cal
