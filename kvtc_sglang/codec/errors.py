"""Exceptions raised by the codec and the calibration artifact loader.

Every decode failure is a subclass of :class:`BlobError` so a cache can turn any of them into a
cache miss (recompute) with one ``except BlobError``; nothing else is swallowed.
"""

from __future__ import annotations


class BlobError(ValueError):
    """An encoded blob cannot be decoded; the caller must treat the entry as missing.

    ``blob_index``: which blob of a batch call (``decode_rows_many``) failed, ``None`` for a single blob."""

    blob_index: int | None = None

    def at(self, index: int) -> BlobError:
        """This error, marked as raised by blob ``index`` of a batch."""
        self.blob_index = index
        return self


class BlobTruncatedError(BlobError):
    """The blob is shorter than its header says."""


class BlobChecksumError(BlobError):
    """A CRC32 (header or chunk) does not match: the bytes were corrupted."""


class BlobVersionError(BlobError):
    """The blob was written by an unknown (newer) format version, or is not a KVTC blob."""


class BlobCalibrationMismatchError(BlobError):
    """The blob was encoded with a different calibration artifact than the decoder holds."""


class BlobPositionsError(BlobError):
    """The blob is intact but holds other token positions than the place it is restored to."""


class ArtifactError(ValueError):
    """A calibration artifact is unreadable, tampered with, or does not fit the model."""
