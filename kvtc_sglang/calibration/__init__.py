"""Offline calibration (never imports the serving glue): ``python -m kvtc_sglang.calibration``."""

from .fit import CalibrationConfig, artifact_name, calibrate

__all__ = ["CalibrationConfig", "artifact_name", "calibrate"]
