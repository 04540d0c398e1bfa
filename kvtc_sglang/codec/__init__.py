"""KVTC codec: imports torch, never SGLang. See :class:`KVTCCodec`."""

from ..payload_format import GroupKind
from .allocation import GROUP_SIZES, KIND_BITS, Allocation, Group
from .artifact import CalibrationArtifact, StreamCalibration, load_artifact, read_header
from .codec import KVTCCodec
from .entropy import EntropyCoder, NvcompDeflate, ZlibDeflate, default_entropy_coder, nvcomp_available
from .errors import (
    ArtifactError,
    BlobCalibrationMismatchError,
    BlobChecksumError,
    BlobError,
    BlobPositionsError,
    BlobTruncatedError,
    BlobVersionError,
)
from .raw import RawCodec, raw_artifact_id
from .rope import RopeConfig, apply_rope, remove_rope
from .spec import ModelSpec

__all__ = [
    "GROUP_SIZES",
    "KIND_BITS",
    "Allocation",
    "ArtifactError",
    "BlobCalibrationMismatchError",
    "BlobChecksumError",
    "BlobError",
    "BlobPositionsError",
    "BlobTruncatedError",
    "BlobVersionError",
    "CalibrationArtifact",
    "EntropyCoder",
    "Group",
    "GroupKind",
    "KVTCCodec",
    "ModelSpec",
    "NvcompDeflate",
    "RawCodec",
    "RopeConfig",
    "StreamCalibration",
    "ZlibDeflate",
    "apply_rope",
    "default_entropy_coder",
    "load_artifact",
    "nvcomp_available",
    "raw_artifact_id",
    "read_header",
    "remove_rope",
]
