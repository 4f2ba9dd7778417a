"""The engine protocol."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np


def importable(module: str) -> bool:
    """Whether ``module`` can be imported here (without importing it)."""
    return importlib.util.find_spec(module) is not None


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
