"""Engines: what runs a variant file. A small protocol plus a lazily-imported registry.

The builder (to evaluate and time variants), the embedded upstream and the Triton launcher's
python-backend models all load variants through this registry, so a variant runs on the same
engine everywhere. An engine's heavy import happens only when it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from server.engines.base import Engine, EngineError, EngineSession

# name -> "module:attribute"; imported on first use.
_REGISTRY: dict[str, str] = {
    "onnxruntime": "server.engines.onnxruntime_engine:OnnxRuntimeEngine",
    "openvino": "server.engines.openvino_engine:OpenVinoEngine",
}
_LOADED: dict[str, Engine] = {}


def register_engine(name: str, target: str) -> None:
    """Register an engine as ``module:attribute`` (a class with a no-argument constructor)."""
    _REGISTRY[name] = target
    _LOADED.pop(name, None)


def engine_names() -> list[str]:
    return sorted(_REGISTRY)


def get_engine(name: str) -> Engine:
    if name in _LOADED:
        return _LOADED[name]
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise EngineError(f"unknown engine {name!r}; known: {', '.join(engine_names())}") from None
    module_name, _, attr = target.partition(":")
    try:
        cls: Any = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise EngineError(f"engine {name!r} is not installed ({e})") from e
    engine = cls()
    _LOADED[name] = engine
    return engine


def available_engines() -> list[str]:
    """Engines whose runtime imports on this host."""
    out = []
    for name in engine_names():
        try:
            if get_engine(name).available():
                out.append(name)
        except EngineError:
            continue
    return out


__all__ = [
    "Engine",
    "EngineError",
    "EngineSession",
    "available_engines",
    "engine_names",
    "get_engine",
    "register_engine",
]
