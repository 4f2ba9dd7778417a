"""The precision plug-in protocol."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from builder.evaluate import Evaluator
    from builder.options import BuildOptions
    from builder.sources.base import LoadedModel


@dataclass
class BuildContext:
    """Everything a precision needs to turn the FP32 reference into its variant."""

    model: LoadedModel
    fp32_path: Path  # the FP32 reference file
    options: BuildOptions
    cache_dir: Path  # per-model cache (calibration ranges, ...)
    evaluator: Evaluator  # quality vs FP32 on the evaluation set
    work_dir: Path  # scratch space, removed after the build
    # Throughput of a candidate file vs FP32 on this host (the budget search's timer); None
    # when speed is not measured (--no-speed). Tests inject a fake.
    speedup: Callable[[Path], float | None] | None = None


@dataclass
class VariantResult:
    """What a precision produced: the file plus how it was made."""

    path: Path
    engine: str = "onnxruntime"
    engine_options: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class Precision(Protocol):
    name: str

    def skip_reason(self, model: LoadedModel, options: BuildOptions) -> str | None:
        """Why this precision cannot be built for ``model`` on this host with ``options``
        (None: it can). The skip is recorded as a note in the manifest."""
        ...

    def build(self, ctx: BuildContext, out_path: Path) -> VariantResult:
        """Write the variant's model file to ``out_path``."""
        ...


@runtime_checkable
class RefusesModels(Protocol):
    """A precision that refuses some models outright when asked for them (int4 on a CNN): the
    build fails with the reason, before any work, instead of skipping with a note."""

    def refusal(self, model: LoadedModel, options: BuildOptions) -> str | None: ...
