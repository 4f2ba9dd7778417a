"""Precision registry: name -> ``module:attribute`` of a Precision class, imported on use."""

from __future__ import annotations

import importlib
from typing import Any

from builder.errors import BuildError
from builder.precisions.base import BuildContext, Precision, VariantResult

_REGISTRY: dict[str, str] = {
    "fp32": "builder.precisions.fp32:FP32",
    "fp16": "builder.precisions.fp16:FP16",
    "bf16": "builder.precisions.bf16:BF16",
    "int8": "builder.precisions.int8:StaticInt8",
    "int8-dynamic": "builder.precisions.int8_dynamic:DynamicInt8",
}


def register_precision(name: str, target: str) -> None:
    _REGISTRY[name] = target


def precision_names() -> list[str]:
    return list(_REGISTRY)


def get_precision(name: str) -> Precision:
    try:
        target = _REGISTRY[name]
    except KeyError:
        known = ", ".join(_REGISTRY)
        raise BuildError(f"unknown precision {name!r}; known: {known}") from None
    module_name, _, attr = target.partition(":")
    try:
        cls: Any = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise BuildError(f"precision {name!r} is not available here ({e})") from e
    return cls()


__all__ = [
    "BuildContext",
    "Precision",
    "VariantResult",
    "get_precision",
    "precision_names",
    "register_precision",
]
