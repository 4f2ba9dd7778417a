"""BuildOptions: everything a build can be told. The CLI fills it in; the pipeline and every
precision plug-in read it (a module of its own, so plug-ins need not import the pipeline)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from builder.calibration import METHODS
from builder.errors import BuildError
from common.engines import engine_names

TARGETS = ("cpu", "gpu")


@dataclass
class BuildOptions:
    """Everything a build can be told; the CLI only fills this in."""

    repository: Path = Path("model_repository")
    precisions: list[str] | None = None  # None: the source's defaults
    calibration_method: str = "minmax"
    calibration_data: Path | None = None
    calibration_samples: int = 256
    # Rows (+ optional labels) every quality figure is measured on: evaluation, the
    # accuracy-budget search and the engine-choice gate. None: the source's own set.
    eval_data: Path | None = None
    accuracy_budget: float | None = None  # points of accuracy (see builder.evaluate)
    # Decoder LLMs: max mean KL(fp32 || variant) of next-token distributions, in nats (their
    # accuracy_budget is the perplexity increase over fp32 in percent).
    kl_budget: float | None = None
    # Write a variant that misses the budget anyway (labelled in the manifest and summary).
    keep_over_budget: bool = False
    force: bool = False
    measure_speed: bool = True
    threads: int = 0  # engine threads for evaluation/timing; 0 = engine default
    instance_count: int = 1
    # 0: batch what queued while the engine was busy, never wait for more. On CPUs batching
    # gains little per row for big models, and at low load any wait is pure latency (the
    # gateway benchmark measured 0.67 ms of its p50 waiting at 500 us). Raise it for GPUs.
    max_queue_delay_us: int = 0
    engine: str | None = None  # force one engine for every variant
    target: str = "cpu"
    configs_only: bool = False
    progress: bool = True
    # input name -> largest shape (batch excluded), over the source's own (builder/max_shapes.py)
    max_shapes: dict[str, list[int]] = field(default_factory=dict)
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.repository = Path(self.repository)
        if self.calibration_method not in METHODS:
            raise BuildError(
                f"calibration_method must be one of {', '.join(METHODS)}, "
                f"got {self.calibration_method!r}"
            )
        if self.calibration_samples < 1:
            raise BuildError(f"calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.accuracy_budget is not None and self.accuracy_budget < 0:
            raise BuildError(f"accuracy_budget must be >= 0, got {self.accuracy_budget}")
        if self.kl_budget is not None and self.kl_budget < 0:
            raise BuildError(f"kl_budget must be >= 0, got {self.kl_budget}")
        if self.engine is not None and self.engine not in engine_names():
            raise BuildError(f"unknown engine {self.engine!r}; known: {', '.join(engine_names())}")
        if self.target not in TARGETS:
            raise BuildError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.calibration_data is not None:
            self.calibration_data = Path(self.calibration_data)
        if self.eval_data is not None:
            self.eval_data = Path(self.eval_data)
