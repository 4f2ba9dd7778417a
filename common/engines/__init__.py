"""Engines: what runs a variant file. A small protocol plus a lazily-imported registry.

The builder (to evaluate and time variants), the embedded upstream and the Triton launcher's
python-backend models all load variants through this registry, so a variant runs on the same
engine everywhere. An engine's heavy import happens only when it is used.
"""

from __future__ import annotations

from common.engines.base import Engine, EngineError, EngineSession
from common.plugins import PluginRegistry

_ENGINES = PluginRegistry(
    "engine",
    EngineError,
    {
        "onnxruntime": "common.engines.onnxruntime_engine:OnnxRuntimeEngine",
        "openvino": "common.engines.openvino_engine:OpenVinoEngine",
    },
)
_LOADED: dict[str, Engine] = {}


def register_engine(name: str, target: str) -> None:
    """Register an engine as ``module:attribute`` (a class with a no-argument constructor)."""
    _ENGINES.register(name, target)
    _LOADED.pop(name, None)


def engine_names() -> list[str]:
    return sorted(_ENGINES.names())


def get_engine(name: str) -> Engine:
    if name not in _LOADED:
        _LOADED[name] = _ENGINES.load(name)()
    return _LOADED[name]


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
