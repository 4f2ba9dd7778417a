"""The Triton protocol extensions this gateway implements (ServerMetadata lists exactly these)."""

from __future__ import annotations

EXTENSIONS: tuple[str, ...] = (
    "model_configuration",
    "statistics",
    "binary_tensor_data",
    "parameters",
    "system_shared_memory",
)
