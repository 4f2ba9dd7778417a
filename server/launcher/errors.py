"""The Triton launcher's exception family. The CLI prints one line and exits 2 for any of these."""

from __future__ import annotations


class TritonError(Exception):
    """Base class: a local Triton server could not be prepared, started or reached."""


class TritonNotInstalled(TritonError):
    """No ``tritonserver`` binary (the ``nvidia-pytriton`` wheel, extra ``[triton]``)."""


class TritonRepositoryError(TritonError):
    """The model repository cannot be turned into a repository this Triton binary can serve."""


class TritonStartError(TritonError):
    """``tritonserver`` exited, or did not become ready in time; the message ends with its log."""
