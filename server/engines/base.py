"""The engine protocol."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np


def importable(module: str) -> bool:
    """Whether ``module`` can be imported here (without importing it)."""
    return importlib.util.find_spec(module) is not None


# Hosts with at most this many cores get one intra-op thread per session by default: the gateway's
# event loop (gRPC, parsing) needs the other core, and a second engine thread cost 0.45-0.83x more
# CPU per request at c1-c16 on a 2-core host (docs/gateway.md, "Fast path").
SMALL_HOST_CORES = 2


def default_threads(cores: int | None = None) -> int:
    """``--threads`` when not given: 1 on a host of ``SMALL_HOST_CORES`` or fewer, else 0 (the
    engine decides)."""
    cores = os.cpu_count() if cores is None else cores
    return 1 if cores is not None and cores <= SMALL_HOST_CORES else 0


class EngineError(Exception):
    """An engine is missing, or cannot load or run a model file."""


@dataclass(frozen=True)
class IOSpec:
    """An input or output as the engine sees it; ``shape`` includes the batch dimension (-1)."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]


class EngineSession(Protocol):
    """A loaded model, ready to run. ``run`` is thread-safe and releases the GIL while computing."""

    inputs: list[IOSpec]
    outputs: list[IOSpec]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Engine(Protocol):
    name: str

    def available(self) -> bool:
        """Whether the runtime imports on this host."""
        ...

    def load(
        self, path: Path, options: Mapping[str, Any] | None = None, threads: int = 0
    ) -> EngineSession:
        """Load ``path`` with engine-specific ``options`` (e.g. a precision hint).

        ``threads`` = 0 lets the engine decide.
        """
        ...
