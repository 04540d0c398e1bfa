"""Versioned calibration artifact: safetensors tensors plus a JSON header, never pickle.

File layout: one ``.safetensors`` file whose ``__metadata__["kvtc"]`` is the JSON header. Tensors,
per stream ``s`` in ``keys``/``values``: ``s.mean [F]``, ``s.scale [F]``,
``s.basis [F, R_s]``, ``s.fp8_scale [R_s]``, ``s.variance [F]``, all float32. The header's
``artifact_id`` is a SHA-256 over the tensors and the rest of the header, so a tampered file is
refused.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .allocation import Allocation
from .errors import ArtifactError
from .spec import ModelSpec

FORMAT = "kvtc-calibration"
FORMAT_VERSION = 1
STREAMS = ("keys", "values")


@dataclass(frozen=True)
class StreamCalibration:
    """PCA and bit allocation of one stream.

    ``coeffs [T, R] = ((x [T, F] - mean [F]) / scale [F]) @ basis [F, R]``; ``fp8_scale [R]`` is the
    per-component scale of fp8 groups; ``variance [F]`` is the PCA spectrum (for reports).
    """

    mean: torch.Tensor
    scale: torch.Tensor
    basis: torch.Tensor
    fp8_scale: torch.Tensor
    variance: torch.Tensor
    allocation: Allocation

    def __post_init__(self) -> None:
        f = self.mean.shape[0]
        r = self.allocation.rank
        for part in ("mean", "scale", "variance"):
            if getattr(self, part).shape != (f,):
                raise ArtifactError(f"{part} must be [F={f}], got {tuple(getattr(self, part).shape)}")
        if self.basis.shape != (f, r):
            raise ArtifactError(f"basis must be [F={f}, R={r}], got {tuple(self.basis.shape)}")
        if self.fp8_scale.shape != (r,):
            raise ArtifactError(f"fp8_scale must be [R={r}], got {tuple(self.fp8_scale.shape)}")


@dataclass(frozen=True)
class CalibrationArtifact:
    """Everything the codec needs for one model, as loaded from or written to disk."""

    spec: ModelSpec
    keys: StreamCalibration
    values: StreamCalibration
    target_ratio: float
    info: dict = field(default_factory=dict)  # corpus names, token counts, timings

    def __post_init__(self) -> None:
        for name in STREAMS:
            f = getattr(self, name).mean.shape[0]
            if f != self.spec.num_features:
                raise ArtifactError(f"{name} has F={f} features, model spec needs {self.spec.num_features}")

    @property
    def artifact_id(self) -> bytes:
        """8-byte fingerprint stored in every blob encoded with this calibration."""
        return bytes.fromhex(artifact_digest(self._tensors(), self._header_body()))[:8]

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in STREAMS:
            s: StreamCalibration = getattr(self, name)
            for part in ("mean", "scale", "basis", "fp8_scale", "variance"):
                out[f"{name}.{part}"] = getattr(s, part).to(torch.float32).contiguous()
        return out

    def _header_body(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.spec.to_json(),
            "target_ratio": self.target_ratio,
            "allocation": {name: getattr(self, name).allocation.to_json() for name in STREAMS},
            "bits_per_token": {name: getattr(self, name).allocation.bits_per_token for name in STREAMS},
            "info": self.info,
        }

    def save(self, path: str | Path) -> Path:
        return write_artifact(path, self._tensors(), self._header_body())


def write_artifact(path: str | Path, tensors: dict[str, torch.Tensor], header: dict) -> Path:
    """One safetensors file of ``tensors`` whose ``__metadata__["kvtc"]`` is ``header`` with its ``artifact_id``
    (:func:`artifact_digest` of both) added (any kvtc artifact format)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {**header, "artifact_id": artifact_digest(tensors, header)}
    save_file(tensors, str(path), metadata={"kvtc": json.dumps(header, sort_keys=True)})
    return path


def artifact_digest(tensors: dict[str, torch.Tensor], header: dict) -> str:
    """SHA-256 (hex) over the tensors (by name) and the header less its ``artifact_id``."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].numpy().tobytes())
    h.update(json.dumps({k: v for k, v in header.items() if k != "artifact_id"}, sort_keys=True).encode())
    return h.hexdigest()


def read_header(path: str | Path) -> dict:
    """The JSON header of an artifact, without loading its tensors."""
    header = read_json_header(path)
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format is {header.get('format')!r}, expected {FORMAT!r}")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: calibration format version {version!r}, this kvtc-sglang reads version {FORMAT_VERSION}; "
            "re-run calibration with this version"
        )
    return header


def read_json_header(path: str | Path) -> dict:
    """The ``__metadata__["kvtc"]`` JSON object of a safetensors file (any kvtc format; the caller checks which)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"calibration file not found: {path} (run: python -m kvtc_sglang.calibration)")
    try:
        with path.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ArtifactError(f"{path} is not a safetensors file (header length {n})")
            outer = json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ArtifactError(f"cannot read calibration file {path}: {e}") from e
    meta = outer.get("__metadata__") if isinstance(outer, dict) else None
    if not isinstance(meta, dict) or not isinstance(meta.get("kvtc"), str):
        raise ArtifactError(f"{path} is a safetensors file without a KVTC header")
    try:
        header = json.loads(meta["kvtc"])
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} has a corrupt KVTC header: {e}") from e
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: the KVTC header is a JSON {type(header).__name__}, expected an object")
    return header


def load_artifact(path: str | Path, expect: ModelSpec | None = None) -> CalibrationArtifact:
    """Load and verify an artifact; with ``expect``, refuse one made for another model geometry."""
    header = read_header(path)
    try:
        spec = ModelSpec.from_json(header["model"])
        allocs = {name: Allocation.from_json(header["allocation"][name]) for name in STREAMS}
        target_ratio = float(header["target_ratio"])
        info = dict(header.get("info", {}))
        stored_id = header["artifact_id"]
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{path}: header field missing or invalid: {e}") from e
    if expect is not None:
        problems = spec.mismatches(expect)
        if problems:
            raise ArtifactError(
                f"calibration {path} was made for {spec.name!r}, not {expect.name!r}: " + "; ".join(problems)
            )
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"cannot read tensors of {path}: {e}") from e
    streams = {}
    for name in STREAMS:
        try:
            parts = {p: tensors[f"{name}.{p}"] for p in ("mean", "scale", "basis", "fp8_scale", "variance")}
        except KeyError as e:
            raise ArtifactError(f"{path}: tensor {e} missing") from e
        streams[name] = StreamCalibration(allocation=allocs[name], **parts)
    art = CalibrationArtifact(spec=spec, target_ratio=target_ratio, info=info, **streams)
    if artifact_digest(art._tensors(), art._header_body()) != stored_id:
        raise ArtifactError(f"{path}: artifact_id does not match its contents (file modified or corrupted)")
    return art
