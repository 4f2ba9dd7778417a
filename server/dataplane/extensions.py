"""What ServerMetadata says (gRPC and HTTP), in one place: the server's name and version and the
Triton protocol extensions the gateway implements. A module that implements another extension adds
its name here.

Names are Triton's (``tritonserver``'s own list: docs/protocol/README.md of the server repo).
docs/gateway.md "Triton protocol coverage" says what is and is not implemented, and why.
"""

from __future__ import annotations

import importlib.metadata

SERVER_NAME = "precision-serve"


def server_version() -> str:
    try:
        return importlib.metadata.version("precision-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0"


EXTENSIONS: tuple[str, ...] = (
    "binary_tensor_data",  # HTTP binary tensors (server/transports/http/app.py)
    "model_configuration",  # ModelConfig / GET .../config
    "model_repository",  # index, load, unload (server/dataplane/model_control.py)
    "parameters",  # request/response parameters (precision, timeout)
    "statistics",  # ModelStatistics / GET .../stats (server/dataplane/statistics.py)
    "system_shared_memory",  # regions, shm inputs/outputs (server/dataplane/shared_memory.py)
)

__all__ = ["EXTENSIONS", "SERVER_NAME", "server_version"]
