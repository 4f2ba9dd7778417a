"""The model-source protocol: turns a user's model reference into an FP32 ONNX file plus data."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from common.model_repository import TensorSpec


@dataclass
class Dataset:
    """Rows of model inputs (arrays share their first, batch, dimension) and optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    description: str = ""

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        n = len(self)
        for start in range(0, n, batch_size):
            yield {k: v[start : start + batch_size] for k, v in self.inputs.items()}

    def take(self, n: int) -> Dataset:
        labels = None if self.labels is None else self.labels[:n]
        return Dataset({k: v[:n] for k, v in self.inputs.items()}, labels, self.description)

    def concat(self, other: Dataset) -> Dataset:
        """These rows, then ``other``'s (same inputs; labels only when both have them)."""
        if set(self.inputs) != set(other.inputs):
            raise ValueError(f"inputs differ: {sorted(self.inputs)} vs {sorted(other.inputs)}")
        labels = (
            None
            if self.labels is None or other.labels is None
            else np.concatenate([self.labels, other.labels])
        )
        inputs = {k: np.concatenate([v, other.inputs[k]]) for k, v in self.inputs.items()}
        return Dataset(inputs, labels, f"{self.description} + {other.description}")


@dataclass
class Trainable:
    """The PyTorch module behind a source's FP32 ONNX file, for quantization-aware training
    (``builder.qat``): ``module`` is called positionally with ``input_names`` in order (torch
    tensors) and returns the first output; ``export(module, path)`` writes it to ONNX with the
    same inputs and outputs as the source's own file."""

    module: Any  # torch.nn.Module
    input_names: list[str]
    export: Callable[[Any, Path], None]
    # Per-token states for distillation (encoders): the dotted name of the submodule whose
    # first output is [batch, sequence, hidden], and the input that masks the padding.
    token_states: str | None = None
    token_mask: str | None = None


@dataclass
class LoadedModel:
    """What every source produces for the builder."""

    name: str  # logical model name, used for Triton model names ("digits")
    source: str  # the reference the user gave ("digits", "onnx:/path/m.onnx", ...)
    task: str  # "classification" (top-1 over the first output) | "embedding"
    fp32_onnx: Path  # exported FP32 ONNX file (in the build's work dir or the user's file)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    calibration: Dataset  # representative inputs for INT8 calibration
    evaluation: Dataset  # held-out inputs (+ labels where known) for quality checks
    transformer: bool = False  # transformer models get dynamic INT8 by default
    accuracy_meaningful: bool = True  # False for random-weight models (resnet50)
    default_precisions: list[str] = field(default_factory=lambda: ["fp32", "fp16", "bf16", "int8"])
    max_batch_size: int = 32
    notes: list[str] = field(default_factory=list)
    # The trainable module (torch: and hf: sources and their demos); None: cannot be trained.
    trainable: Trainable | None = None
    # More rows for quantization-aware training only, disjoint from ``evaluation`` (after the
    # calibration rows): None when the source has none.
    training: Dataset | None = None


@dataclass
class LlmModel:
    """What a decoder-LLM source produces: a local Hugging Face causal-LM folder that
    onnxruntime-genai's model builder reads (builder/llm/)."""

    name: str  # logical model name ("smollm2")
    source: str  # the reference the user gave
    hf_folder: Path  # config.json, weights, tokenizer (and chat template)
    architecture: str  # config.json's architectures[0], e.g. "LlamaForCausalLM"
    default_precisions: list[str] = field(default_factory=lambda: ["fp32", "int8", "int4"])
    notes: list[str] = field(default_factory=list)
    # What the fp32 variant is where it is not the original weights (SmolLM2: dequantized Q4_1).
    reference_note: str = ""


@dataclass(frozen=True)
class SourceCapabilities:
    """What a source kind declares it produces; builder.sources dispatches on it.

    ``onnx``: ``load`` gives a :class:`LoadedModel` (an FP32 ONNX export plus data).
    ``decoder_llm``: ``load_llm`` gives an :class:`LlmModel`. A source declaring both
    (``hf:``) answers ``is_decoder_llm(reference)`` from the reference itself (config.json).
    ``preview``: ``preview`` gives the model's graph without the source's costly work
    (training; the digits demo), enough for a precision to decide it refuses the model."""

    onnx: bool = True
    decoder_llm: bool = False
    preview: bool = False


class ModelSource(Protocol):
    """A source kind. ``reference`` is what follows the prefix (``onnx:`` -> the path)."""

    capabilities: ClassVar[SourceCapabilities]

    def load(self, reference: str, workdir: Path) -> LoadedModel: ...


class PreviewSource(Protocol):
    """A source kind whose capabilities declare ``preview``."""

    capabilities: ClassVar[SourceCapabilities]

    def preview(self, reference: str, workdir: Path) -> LoadedModel: ...


class LlmSource(Protocol):
    """A source kind whose capabilities declare ``decoder_llm``."""

    capabilities: ClassVar[SourceCapabilities]

    def load_llm(self, reference: str, workdir: Path) -> LlmModel: ...

    def is_decoder_llm(self, reference: str) -> bool:
        """Only asked of sources declaring both capabilities."""
        ...
