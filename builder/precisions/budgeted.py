"""Quantizing a precision within ``--accuracy-budget``: the per-node error ranking
(``builder.drift``) and the search for the fastest variant within it (``builder.budget``)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from builder.budget import BudgetOutcome, SearchLimits, search
from builder.precisions.base import BuildContext

log = logging.getLogger(__name__)

# (nodes to keep unquantized, file to write) -> None
QuantizeFn = Callable[[list[str], Path], None]
DRIFT_SAMPLES = 8  # evaluation rows the per-node error ranking runs on
DRIFT_REPORTED = 8


def build_within_budget(
    ctx: BuildContext,
    out_path: Path,
    float_path: Path,
    quantize: QuantizeFn,
    op_types: Collection[str] | None = None,
    diagnose: bool = False,
    timed: bool = True,
    nodes: Collection[str] | None = None,
) -> tuple[BudgetOutcome, dict[str, Any]]:
    """Quantize ``float_path`` with ``quantize`` into ``out_path`` within ``ctx``'s budget.

    Returns the outcome and the diagnostic details (the per-node error ranking, computed when
    the search needs it or ``diagnose`` asks; ``op_types`` limits which nodes may be kept).
    ``timed=False``: candidates are not timed against FP32, so the fewest kept layers within
    the budget win (int4, whose point is size: it runs slower than FP32 on CPUs here).
    ``nodes``: only these may be kept (the ones the precision quantizes; a MatMul of two
    activations shows error too, but keeping it changes nothing)."""
    from builder.drift import node_errors

    candidates = ctx.work_dir / "budget-candidates"
    candidates.mkdir(parents=True, exist_ok=True)
    diagnostics: dict[str, Any] = {}
    errors: list[Any] = []

    def make(kept: list[str]) -> tuple[Path, float]:
        path = candidates / f"kept-{len(kept)}.onnx"
        quantize(kept, path)
        return path, float(ctx.evaluator.quality(path)["accuracy_loss"] or 0.0)

    def analyse(path: Path) -> None:
        try:
            sample = ctx.model.evaluation.take(DRIFT_SAMPLES)
            errors[:] = node_errors(float_path, path, sample, ctx.work_dir / "drift", op_types)
        except Exception as e:  # a diagnostic: never fail the build on it
            log.warning("per-node error analysis failed: %s", e)
        by_sqnr = sorted(errors, key=lambda e: e.output_sqnr_db)[:DRIFT_REPORTED]
        diagnostics["lowest_sqnr_layers"] = [
            {"tensor": e.node, "op_type": e.op_type, "sqnr_db": round(e.output_sqnr_db, 2)}
            for e in by_sqnr
        ]
        diagnostics["worst_nodes"] = [
            {"node": e.node, "op_type": e.op_type, "added_noise": float(f"{e.added_noise:.3g}")}
            for e in errors[:DRIFT_REPORTED]
        ]

    def rank(path: Path) -> list[str]:
        if not errors:
            analyse(path)
        return [e.node for e in errors if nodes is None or e.node in nodes]

    limits = SearchLimits(progress=ctx.options.progress)
    speed = ctx.speedup if ctx.options.measure_speed and timed else None
    outcome = search(rank, make, speed, ctx.options.accuracy_budget, out_path, limits)
    if diagnose and not diagnostics:
        analyse(outcome.attempts[0].path)  # the fully quantized file
    return outcome, diagnostics
