"""The model-source protocol: turns a user's model reference into an FP32 ONNX file plus data."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

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


class ModelSource(Protocol):
    """A source kind. ``reference`` is what follows the prefix (``onnx:`` -> the path)."""

    def load(self, reference: str, workdir: Path) -> LoadedModel: ...
