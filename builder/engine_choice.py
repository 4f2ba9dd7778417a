"""Which engine runs a variant: measured on this host, quality-checked, overridable.

For each built variant file the candidates are the precision's own engine (what the plug-in
returned) and, when the plug-in's engine options carry no engine-specific precision setting,
every other engine installed here with its default CPU options. Each candidate must load and
its quality vs FP32 must be within :data:`QUALITY_TOLERANCE` points of the own engine's (same
file, same evaluation set). The survivors are timed round-robin (``builder.evaluate.measure_speed``
per engine per round: warm-up, batch-1 latency, throughput; medians over rounds) at the model's
speed batch; the fastest by throughput wins,
but an alternative must beat the own engine by :data:`MIN_GAIN` so noise does not flip the
choice. ``--engine`` overrides all of this; ``--no-speed`` keeps the own engine.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.errors import BuildError
from builder.evaluate import Evaluator, measure_speed
from builder.sources.base import Dataset
from common.engines import EngineError, available_engines, get_engine

if TYPE_CHECKING:
    from builder.precisions.base import VariantResult

log = logging.getLogger(__name__)

# Default options an engine gets when it is tried on a file built for another engine.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "onnxruntime": {},
    "openvino": {"inference_precision": "f32"},
}
QUALITY_TOLERANCE = 0.25  # points of accuracy_loss (builder.evaluate.accuracy_loss)
MIN_GAIN = 1.05  # an alternative engine must be >= 5 % faster than the precision's own
ROUNDS = 3  # round-robin rounds over the candidate engines
INNER_ROUNDS = 3  # measure_speed rounds per engine per round (batch runs)
LATENCY_RUNS = 9  # batch-1 runs per engine per round
SETTLE_SECONDS = 0.05  # pause before timing an engine: the previous one's threads go idle


@dataclass
class EngineChoice:
    engine: str
    options: dict[str, Any]
    quality: dict[str, float | None]  # of the chosen engine on the variant file
    reason: str
    timings: dict[str, dict[str, Any]] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)

    def details(self) -> dict[str, Any]:
        """What the manifest records about the choice (``VariantRecord.details``)."""
        out: dict[str, Any] = {"engine_choice": self.reason}
        if self.timings:
            out["engine_timings"] = self.timings
        if self.rejected:
            out["engine_rejected"] = self.rejected
        return out


def tied_to_engine(options: Mapping[str, Any]) -> bool:
    """Options carrying an engine-specific setting (e.g. the BF16 hint) pin the engine."""
    return bool(options)


def candidates(own_engine: str, own_options: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """(engine, options) pairs to try, the precision's own first."""
    out = [(own_engine, dict(own_options))]
    if tied_to_engine(own_options):
        return out
    for name in available_engines():
        if name != own_engine and name in DEFAULT_OPTIONS:
            out.append((name, dict(DEFAULT_OPTIONS[name])))
    return out


def _override(forced: str, result: VariantResult, path: Path, evaluator: Evaluator) -> EngineChoice:
    if forced == result.engine:
        options = dict(result.engine_options)
    elif tied_to_engine(result.engine_options):
        raise BuildError(
            f"this variant runs only on engine {result.engine!r} (options "
            f"{result.engine_options}); --engine {forced} cannot run it"
        )
    else:
        options = dict(DEFAULT_OPTIONS.get(forced, {}))
    get_engine(forced)  # an unknown or missing engine fails here, naming it
    quality = evaluator.quality(path, forced, options)
    return EngineChoice(forced, options, quality, f"--engine {forced} (not measured)")


def choose_engine(
    result: VariantResult,
    path: Path,
    evaluator: Evaluator,
    sample: Dataset,
    batch_size: int,
    forced: str | None = None,
    measure: bool = True,
    threads: int = 0,
) -> EngineChoice:
    """Pick the engine for the variant file at ``path`` (see the module docstring)."""
    if forced:
        return _override(forced, result, path, evaluator)
    own, own_options = result.engine, dict(result.engine_options)
    get_engine(own)
    own_quality = evaluator.quality(path, own, own_options)
    tried = candidates(own, own_options)
    if not measure or len(tried) == 1:
        why = "speed not measured" if not measure else "the only engine for this variant"
        return EngineChoice(own, own_options, own_quality, f"{own}: {why}")

    qualities: dict[str, dict[str, float | None]] = {own: own_quality}
    options: dict[str, dict[str, Any]] = {own: own_options}
    rejected: dict[str, str] = {}
    sessions = {}
    for engine, opts in tried:
        try:
            sessions[engine] = get_engine(engine).load(path, opts, threads)
            if engine != own:
                q = evaluator.quality(path, engine, opts)
                worse = _worse(q, own_quality)
                if worse:
                    rejected[engine] = worse
                    del sessions[engine]
                    continue
                qualities[engine], options[engine] = q, opts
        except EngineError as e:
            if engine == own:
                raise
            rejected[engine] = "cannot run this file: " + _short(str(e))
            sessions.pop(engine, None)
    for engine, why in rejected.items():
        log.info("engine %s rejected for %s: %s", engine, path, why)
    if len(sessions) == 1:
        why = f"{own}: the only engine that passed (rejected: {', '.join(rejected)})"
        return EngineChoice(own, own_options, own_quality, why, rejected=rejected)
    timings = _timings(sessions, options, sample, batch_size)
    own_speed = timings[own]["throughput"]
    best = max(timings, key=lambda e: timings[e]["throughput"])
    if best != own and timings[best]["throughput"] < own_speed * MIN_GAIN:
        best = own
    ratio = timings[best]["throughput"] / own_speed
    reason = (
        f"{best}: fastest measured ({ratio:.2f}x {own})"
        if best != own
        else f"{own}: fastest measured (alternatives not >= {MIN_GAIN:.2f}x faster)"
    )
    return EngineChoice(best, options[best], qualities[best], reason, timings, rejected)


def _short(message: str, limit: int = 400) -> str:
    """One line, bounded: engines' load errors run to pages."""
    line = " ".join(message.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _worse(candidate: Mapping[str, Any], own: Mapping[str, Any]) -> str | None:
    """Why ``candidate``'s quality is not acceptable next to ``own``'s (None: it is)."""
    if not candidate.get("finite", 1.0):
        return "non-finite outputs"
    loss = float(candidate.get("accuracy_loss") or 0.0)
    own_loss = float(own.get("accuracy_loss") or 0.0)
    if loss > own_loss + QUALITY_TOLERANCE:
        return (
            f"accuracy loss {loss:.3f} points vs {own_loss:.3f} on the precision's own engine "
            f"(tolerance {QUALITY_TOLERANCE})"
        )
    return None


def measure_round_robin(
    sessions: Mapping[str, Any],
    sample: Dataset,
    batch_size: int,
    rounds: int = ROUNDS,
    inner_rounds: int = INNER_ROUNDS,
    latency_runs: int = LATENCY_RUNS,
) -> dict[str, dict[str, float]]:
    """``measure_speed``'s result, fairer across engines: round-robin over the sessions, each
    timed in its own ``measure_speed`` call (which warms it up first) after a short pause;
    medians over the rounds. Timing engines run by run in one call is biased: ONNX Runtime's
    worker threads keep spinning after a run and steal the cores from whichever session runs
    next (docs/engines.md has the numbers)."""
    got: dict[str, list[dict[str, float]]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            time.sleep(SETTLE_SECONDS)
            speed = measure_speed(
                {name: session}, sample, batch_size, rounds=inner_rounds, latency_runs=latency_runs
            )
            got[name].append(speed[name])
    return {
        name: {
            "latency_ms_p50": statistics.median(r["latency_ms_p50"] for r in runs),
            "throughput": statistics.median(r["throughput"] for r in runs),
            "batch_size": runs[0]["batch_size"],
        }
        for name, runs in got.items()
    }


def _timings(
    sessions: Mapping[str, Any],
    options: Mapping[str, dict[str, Any]],
    sample: Dataset,
    batch_size: int,
) -> dict[str, dict[str, Any]]:
    speeds = measure_round_robin(sessions, sample, batch_size)
    return {
        name: {
            "options": options[name],
            "throughput": round(float(s["throughput"]), 3),
            "latency_ms_p50": round(float(s["latency_ms_p50"]), 4),
            "batch_size": int(s["batch_size"]),
        }
        for name, s in speeds.items()
    }
