"""The builder's exception family. The CLI turns any of these into one line and exit code 2."""

from __future__ import annotations

from common.model_repository.errors import RepositoryError


class BuildError(Exception):
    """Base class: a build could not be done, for a reason the user can act on."""


class SourceError(BuildError):
    """The model source is unknown, unreadable or invalid."""


class CalibrationDataError(BuildError):
    """Calibration data is missing, unreadable or does not match the model's inputs."""


class QuantizationError(BuildError):
    """A precision variant could not be produced from the FP32 model."""


class BudgetNotMet(QuantizationError):
    """A quantized variant missed ``--accuracy-budget`` (or met it only slower than FP32); it
    is not written unless ``--keep-over-budget`` asks for it."""


# The model repository's own errors (unreadable manifest, unwritable folder, bad config.pbtxt)
# are common.model_repository.RepositoryError: the gateway reads repositories too, and it sits
# below the builder. builder.cli reports both families the same way.
USER_ERRORS: tuple[type[Exception], ...] = (BuildError, RepositoryError)
