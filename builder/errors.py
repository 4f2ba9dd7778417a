"""The builder's exception family. The CLI turns any of these into one line and exit code 2."""

from __future__ import annotations


class BuildError(Exception):
    """Base class: a build could not be done, for a reason the user can act on."""


class SourceError(BuildError):
    """The model source is unknown, unreadable or invalid."""


class CalibrationDataError(BuildError):
    """Calibration data is missing, unreadable or does not match the model's inputs."""


class QuantizationError(BuildError):
    """A precision variant could not be produced from the FP32 model."""


class RepositoryError(BuildError):
    """The model repository cannot be written or read."""
