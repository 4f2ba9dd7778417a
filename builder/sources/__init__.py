"""Model-source registry: ``onnx:PATH``, ``torch:MODULE:FACTORY``, ``hf:FOLDER`` and the demos.

Each entry is ``module:attribute`` and is imported only when used, so the heavy imports
(torch, transformers, sklearn) happen only for the sources that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

from builder.errors import SourceError
from builder.sources.base import (
    Dataset,
    LlmModel,
    LlmSource,
    LoadedModel,
    ModelSource,
    PreviewSource,
)
from common.plugins import PluginRegistry

_HINT = "install the extra: pip install 'precision-serve[build]'"
# "prefix:reference" sources.
PREFIX_SOURCES = PluginRegistry(
    "model source",
    SourceError,
    {
        "onnx": "builder.sources.onnx_file:OnnxFileSource",
        "torch": "builder.sources.torch_module:TorchModuleSource",
        "hf": "builder.sources.hf_folder:HfFolderSource",
    },
    missing_hint=_HINT,
)
# Built-in demo models, named without a prefix.
DEMO_SOURCES = PluginRegistry(
    "model source",
    SourceError,
    {
        "digits": "builder.sources.demos.digits:DigitsSource",
        "minilm": "builder.sources.demos.minilm:MiniLMSource",
        "resnet50": "builder.sources.demos.resnet50:ResNet50Source",
        "smollm2": "builder.sources.demos.smollm2:SmolLM2Source",
    },
    missing_hint=_HINT,
)


def resolve(spec: str) -> tuple[ModelSource, str]:
    """The source for ``spec`` and the reference to hand it."""
    if spec in DEMO_SOURCES:
        return DEMO_SOURCES.load(spec)(), spec
    prefix, sep, reference = spec.partition(":")
    if sep and prefix in PREFIX_SOURCES:
        if not reference:
            raise SourceError(f"model source {spec!r} names no {prefix} reference")
        return PREFIX_SOURCES.load(prefix)(), reference
    known = ", ".join([*DEMO_SOURCES, *(f"{p}:..." for p in PREFIX_SOURCES)])
    raise SourceError(f"unknown model source {spec!r}; use one of: {known}")


def llm_source(spec: str) -> tuple[LlmSource, str] | None:
    """The decoder-LLM source for ``spec`` and its reference, or None when ``spec`` is not an
    LLM, as its source's capabilities declare (``hf:`` asks the folder's config.json)."""
    source, reference = resolve(spec)
    caps = source.capabilities
    if not caps.decoder_llm:
        return None
    llm: LlmSource = source  # type: ignore[assignment]
    if caps.onnx and not llm.is_decoder_llm(reference):
        return None
    return llm, reference


def load_llm(spec: str, workdir: Path) -> LlmModel:
    found = llm_source(spec)
    if found is None:
        raise SourceError(f"model source {spec!r} is not a decoder LLM")
    source, reference = found
    return source.load_llm(reference, Path(workdir))


def load_model(spec: str, workdir: Path) -> LoadedModel:
    source, reference = resolve(spec)
    if not source.capabilities.onnx:
        raise SourceError(f"model source {spec!r} is a decoder LLM (builder/llm builds it)")
    model = source.load(reference, Path(workdir))
    model.source = spec
    return model


def preview_model(spec: str, workdir: Path) -> LoadedModel | None:
    """The model's graph without the source's costly work (training), for the sources whose
    capabilities declare one (the digits demo): enough for a precision's refusal."""
    source, reference = resolve(spec)
    if not source.capabilities.preview:
        return None
    model = cast(PreviewSource, source).preview(reference, Path(workdir))
    model.source = spec
    return model


__all__ = [
    "DEMO_SOURCES",
    "PREFIX_SOURCES",
    "Dataset",
    "LlmModel",
    "LoadedModel",
    "llm_source",
    "load_llm",
    "load_model",
    "preview_model",
    "resolve",
]
