"""Choosing SmoothQuant's alpha (``builder.smoothquant``) for an INT8 precision.

The float model is quantized fully once without rescaling and once per ``--smoothquant-alphas``
value (0.5, 0.8), each checked against FP32 (and timed, where the budget search times). A
rescaling is kept only when it helps: its fully quantized loss must be below
``HELPS`` x the unscaled one (and ``MIN_GAIN`` points lower). With ``--accuracy-budget``, of
the helpful candidates within the budget fully quantized, the fastest (unscaled first when
untimed); when none is, the lowest loss, which the budget search then starts from. Without a
budget, ``int8`` and ``int8-dynamic`` are not rescaled (their default builds are as before);
``int8-qat`` always chooses (the lowest loss): its training starts from the rescaled model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.budget import MIN_SPEEDUP
from builder.precisions.base import BuildContext
from builder.precisions.budgeted import QuantizeFn
from builder.precisions.smoothing_options import SmoothOptions

log = logging.getLogger(__name__)

HELPS = 0.9  # a rescaling's fully quantized loss must be below this x the unscaled one
MIN_GAIN = 0.001  # and this many points below it (the loss is recorded to 4 decimals)


@dataclass
class Trial:
    alpha: float | None
    pre: Path  # the pre-processed float file quantized
    loss: float | None = None
    speedup: float | None = None
    smoothing: Any = None  # builder.smoothquant.Smoothing

    def record(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "accuracy_loss": None if self.loss is None else round(self.loss, 4),
            "speedup_vs_fp32": None if self.speedup is None else round(self.speedup, 3),
        }


@dataclass
class Choice:
    chosen: Trial
    why: str
    tried: list[Trial] = field(default_factory=list)

    @property
    def pre(self) -> Path:
        return self.chosen.pre

    @property
    def alpha(self) -> float | None:
        return self.chosen.alpha

    def details(self) -> dict[str, Any]:
        d: dict[str, Any] = {"alpha": self.chosen.alpha, "why": self.why}
        if self.chosen.smoothing is not None:
            d.update(self.chosen.smoothing.details())
        if self.tried:
            d["tried"] = [t.record() for t in self.tried]
        return {"smoothquant": d}


def _helps(t: Trial, base: Trial) -> bool:
    if t.alpha is None:
        return True
    assert t.loss is not None and base.loss is not None
    return t.loss < HELPS * base.loss and t.loss < base.loss - MIN_GAIN


def pick(trials: list[Trial], budget: float | None) -> tuple[Trial, str]:
    """The trial to quantize (``trials[0]`` unscaled), and why."""
    base = trials[0]
    useful = [t for t in trials if _helps(t, base)]
    if budget is not None:
        within = [
            t
            for t in useful
            if t.loss is not None
            and t.loss <= budget
            and (t.speedup is None or t.speedup >= MIN_SPEEDUP)
        ]
        if within:
            best = max(within, key=lambda t: (t.speedup or 0.0, t.alpha is None, -(t.loss or 0)))
            return best, f"fastest within budget {budget:g} fully quantized"
    best = min(useful, key=lambda t: (t.loss or 0.0, t.alpha is not None))
    if best.alpha is None:
        return best, "no rescaling lowered the fully quantized loss enough"
    return best, "lowest fully quantized loss"


def choose_smoothing(
    ctx: BuildContext,
    name: str,
    quantizer_for: Callable[[Path], QuantizeFn],
    search: bool | None = None,
) -> Choice:
    """The float file ``name`` quantizes: ``ctx.fp32_path`` pre-processed, rescaled with the
    alpha chosen (module docstring). ``quantizer_for(pre)`` quantizes a pre-processed file;
    ``search`` None: only with ``--accuracy-budget``."""
    from builder.prepare import preprocess
    from builder.smoothquant import smooth

    opts = ctx.options
    alphas = SmoothOptions.from_extra(opts.extra).alphas
    base = Trial(None, preprocess(ctx.fp32_path, ctx.work_dir / f"{name}_pre.onnx"))
    if search is None:
        search = opts.accuracy_budget is not None
    if not search or not alphas:
        why = "--smoothquant-alphas none" if not alphas else "not searched without a budget"
        return Choice(base, why)
    timed = ctx.speedup is not None and opts.measure_speed and opts.accuracy_budget is not None
    batch = 1 if ctx.model.max_batch_size == 0 else 8
    calibration = ctx.model.calibration.take(opts.calibration_samples)
    trials = [base]
    for alpha in alphas:
        smoothed = ctx.work_dir / f"{name}_sq{alpha:g}.onnx"
        record = smooth(ctx.fp32_path, smoothed, alpha, calibration, batch)
        pre = ctx.work_dir / f"{name}_sq{alpha:g}_pre.onnx"
        trials.append(Trial(alpha, preprocess(smoothed, pre), smoothing=record))
    for t in trials:
        path = ctx.work_dir / f"{name}_sq{t.alpha or 0:g}_full.onnx"
        quantizer_for(t.pre)([], path)
        t.loss = float(ctx.evaluator.quality(path)["accuracy_loss"] or 0.0)
        if timed and ctx.speedup is not None:
            t.speedup = ctx.speedup(path)
        log.info("%s: SmoothQuant alpha %s: loss %.3f, speed %s", name, t.alpha, t.loss, t.speedup)
    chosen, why = pick(trials, opts.accuracy_budget)
    return Choice(chosen, why, trials)
