"""The Triton protocol extensions the gateway implements: what ServerMetadata lists (gRPC and
HTTP), in one place. A module that implements another extension adds its name here.

Names are Triton's (``tritonserver``'s own list: docs/protocol/README.md of the server repo).
docs/gateway.md "Triton protocol coverage" says what is and is not implemented, and why.
"""

from __future__ import annotations

EXTENSIONS: tuple[str, ...] = (
    "binary_tensor_data",  # HTTP binary tensors (server/http_app.py)
    "model_configuration",  # ModelConfig / GET .../config
    "model_repository",  # index, load, unload (server/model_control.py)
    "parameters",  # request/response parameters (precision, timeout)
    "statistics",  # ModelStatistics / GET .../stats (server/statistics.py)
    "system_shared_memory",  # regions, shm inputs/outputs (server/shared_memory.py)
)

__all__ = ["EXTENSIONS"]
