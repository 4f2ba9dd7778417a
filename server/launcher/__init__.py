"""A local NVIDIA Triton server on a precision-serve repository (the ``nvidia-pytriton`` binary).

``TritonServer`` (server.launcher.tritonserver) derives a python-backend repository from the
standard one (server.launcher.derive), starts ``tritonserver`` and stops it; ``precision-serve
triton start`` (server.launcher.cli) does the same from the command line. Importing this package
imports neither tritonserver nor pytriton.
"""

from server.launcher.errors import (
    TritonError,
    TritonNotInstalled,
    TritonRepositoryError,
    TritonStartError,
)

__all__ = ["TritonError", "TritonNotInstalled", "TritonRepositoryError", "TritonStartError"]
