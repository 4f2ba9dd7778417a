"""Model-source registry: ``onnx:PATH``, ``torch:MODULE:FACTORY``, ``hf:FOLDER`` and the demos.

Each entry is ``module:attribute`` and is imported only when used, so the heavy imports
(torch, transformers, sklearn) happen only for the sources that need them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from builder.errors import SourceError
from builder.sources.base import Dataset, LoadedModel, ModelSource

# "prefix:reference" sources.
PREFIX_SOURCES: dict[str, str] = {
    "onnx": "builder.sources.onnx_file:OnnxFileSource",
    "torch": "builder.sources.torch_module:TorchModuleSource",
    "hf": "builder.sources.hf_folder:HfFolderSource",
}
# Built-in demo models, named without a prefix.
DEMO_SOURCES: dict[str, str] = {
    "digits": "builder.sources.demos.digits:DigitsSource",
    "minilm": "builder.sources.demos.minilm:MiniLMSource",
    "resnet50": "builder.sources.demos.resnet50:ResNet50Source",
}


def _instantiate(target: str) -> ModelSource:
    module_name, _, attr = target.partition(":")
    try:
        cls: Any = getattr(importlib.import_module(module_name), attr)
    except ImportError as e:
        raise SourceError(
            f"model source {module_name} needs a package that is not installed ({e}); "
            "install the extra: pip install 'precision-serve[build]'"
        ) from e
    return cls()


def resolve(spec: str) -> tuple[ModelSource, str]:
    """The source for ``spec`` and the reference to hand it."""
    if spec in DEMO_SOURCES:
        return _instantiate(DEMO_SOURCES[spec]), spec
    prefix, sep, reference = spec.partition(":")
    if sep and prefix in PREFIX_SOURCES:
        if not reference:
            raise SourceError(f"model source {spec!r} names no {prefix} reference")
        return _instantiate(PREFIX_SOURCES[prefix]), reference
    known = ", ".join([*DEMO_SOURCES, *(f"{p}:..." for p in PREFIX_SOURCES)])
    raise SourceError(f"unknown model source {spec!r}; use one of: {known}")


def load_model(spec: str, workdir: Path) -> LoadedModel:
    source, reference = resolve(spec)
    model = source.load(reference, Path(workdir))
    model.source = spec
    return model


__all__ = ["DEMO_SOURCES", "PREFIX_SOURCES", "Dataset", "LoadedModel", "load_model", "resolve"]
