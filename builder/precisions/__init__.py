"""Precision registry: name -> ``module:attribute`` of a Precision class, imported on use."""

from __future__ import annotations

from builder.errors import BuildError
from builder.precisions.base import BuildContext, Precision, RefusesModels, VariantResult
from common.plugins import PluginRegistry

_PRECISIONS = PluginRegistry(
    "precision",
    BuildError,
    {
        "fp32": "builder.precisions.fp32:FP32",
        "fp16": "builder.precisions.fp16:FP16",
        "bf16": "builder.precisions.bf16:BF16",
        "int8": "builder.precisions.int8:StaticInt8",
        "int8-dynamic": "builder.precisions.int8_dynamic:DynamicInt8",
        "int8-qat": "builder.precisions.int8_qat:QatInt8",
        "int4": "builder.precisions.int4:Int4",
    },
)


def register_precision(name: str, target: str) -> None:
    _PRECISIONS.register(name, target)


def precision_names() -> list[str]:
    return _PRECISIONS.names()


def get_precision(name: str) -> Precision:
    return _PRECISIONS.load(name)()


__all__ = [
    "BuildContext",
    "Precision",
    "RefusesModels",
    "VariantResult",
    "get_precision",
    "precision_names",
    "register_precision",
]
