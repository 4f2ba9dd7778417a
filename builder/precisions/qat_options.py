"""The int8-qat precision's options: a dataclass read from ``BuildOptions.extra`` and the
``precision-build`` flags that fill it (light: no torch import)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from builder.errors import BuildError
from builder.precisions.extra_options import from_extra

WHEN = ("auto", "never", "always")
MODES = ("auto", "static", "dynamic")
EXTRA_KEY = "qat"


@dataclass
class QatOptions:
    """When and how quantization-aware training runs (``builder.qat``).

    when: auto - with --accuracy-budget, int8-qat is built when no post-training INT8 variant
        met the budget fully quantized (and the source can be trained); never - not built, even
        when asked for; always - built for every source that can be trained.
    mode: which deployed quantizer the training emulates (static QDQ or dynamic INT8); auto
        tries them in the order of their measured speed on this host.
    steps / batch_size / lr: the fine-tuning; lr None: 2e-5 for transformers, 1e-4 otherwise.
    max_seconds: training stops at this bound (checked between steps).
    max_start_loss: a mode whose post-training loss (points) is above this is not trained: a
        bounded fine-tuning recovers a few points, not a collapse.
    """

    when: str = "auto"
    mode: str = "auto"
    steps: int = 100
    batch_size: int = 16
    lr: float | None = None
    max_seconds: float = 900.0
    max_start_loss: float = 10.0

    def __post_init__(self) -> None:
        if self.when not in WHEN:
            raise BuildError(f"qat must be one of {', '.join(WHEN)}, got {self.when!r}")
        if self.mode not in MODES:
            raise BuildError(f"qat mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise BuildError(
                f"qat steps and batch size must be >= 1 ({self.steps}, {self.batch_size})"
            )
        if self.lr is not None and self.lr <= 0:
            raise BuildError(f"qat lr must be > 0, got {self.lr}")

    def training_key(self) -> dict[str, object]:
        """What determines the trained weights (the cache key's settings part)."""
        d = asdict(self)
        for k in ("when", "mode", "max_start_loss"):
            d.pop(k)
        return d

    @classmethod
    def from_extra(cls, extra: Mapping[str, object]) -> QatOptions:
        return from_extra(cls, extra, EXTRA_KEY, "qat")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("int8-qat (quantization-aware training, torch:/hf: sources)")
    g.add_argument(
        "--qat",
        choices=WHEN,
        default="auto",
        help="auto: with --accuracy-budget, train INT8 back when post-training INT8 misses it "
        "fully quantized; never; always (default: auto)",
    )
    g.add_argument(
        "--qat-mode",
        choices=MODES,
        default="auto",
        help="the deployed quantizer the training emulates (auto: both, fastest first)",
    )
    g.add_argument("--qat-steps", type=int, default=100, help="optimizer steps (default 100)")
    g.add_argument("--qat-batch-size", type=int, default=16)
    g.add_argument(
        "--qat-lr", type=float, help="learning rate (default 2e-5 transformers, 1e-4 others)"
    )
    g.add_argument(
        "--qat-max-seconds", type=float, default=900.0, help="training time bound per mode"
    )


def extra_from_args(args: argparse.Namespace) -> dict[str, object]:
    return {
        EXTRA_KEY: {
            "when": args.qat,
            "mode": args.qat_mode,
            "steps": args.qat_steps,
            "batch_size": args.qat_batch_size,
            "lr": args.qat_lr,
            "max_seconds": args.qat_max_seconds,
        }
    }
