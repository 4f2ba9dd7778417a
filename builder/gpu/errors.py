"""Errors of the GPU path; all are ``BuildError`` so the CLI prints one line and exits non-zero."""

from __future__ import annotations

from builder.errors import BuildError

INSTALL_HINT = "pip install 'precision-serve[gpu]'"


class GpuUnavailableError(BuildError):
    """This host lacks CUDA or TensorRT, so no engine can be built here."""


class EngineBuildError(BuildError):
    """TensorRT could not parse the ONNX file or build an engine from it."""


class GpuVariantError(BuildError):
    """A variant cannot be prepared for a GPU target (wrong quantization, missing file, ...)."""
