"""Which engine runs a variant: measured on this host, quality-checked, overridable.

For each built variant file the candidates are the precision's own engine (what the plug-in
returned) and, when the plug-in's engine options carry no engine-specific precision setting,
every other engine installed here with its default CPU options. Each candidate must load and
its quality vs FP32 must be within :data:`QUALITY_TOLERANCE` points of the own engine's (same
file, same evaluation set). The survivors are timed round-robin (``builder.evaluate.measure_speed``
per engine per round: warm-up, batch-1 latency, throughput), one throughput per engine per
round, at the model's speed batch. The fastest by median throughput replaces the own engine
only when its lead is larger than the spread of the rounds and at least :data:`MIN_GAIN`
(``common.engine_lead.judge``); otherwise the own engine stays, "within noise". The rounds
(min / median / max, spread), the decision and the load average during the timing go into the
manifest (``EngineChoice.details``); a load average over the core count marks the timing
``busy``. ``--engine`` overrides all of this; ``--no-speed`` keeps the own engine.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder import hostinfo
from builder.errors import BuildError
from builder.evaluate import Evaluator, measure_speed
from builder.sources.base import Dataset
from common.engine_lead import BEYOND_NOISE, MIN_GAIN, WITHIN_NOISE, judge, summary
from common.engines import EngineError, available_engines, get_engine
from common.hostinfo import busy_phrase

if TYPE_CHECKING:
    from builder.precisions.base import VariantResult

log = logging.getLogger(__name__)

# Default options an engine gets when it is tried on a file built for another engine.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "onnxruntime": {},
    "openvino": {"inference_precision": "f32"},
}
QUALITY_TOLERANCE = 0.25  # points of accuracy_loss (builder.evaluate.accuracy_loss)
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
    # common.engine_lead.Lead.record() plus load_average, cores and busy during the timing
    decision: dict[str, Any] = field(default_factory=dict)

    def details(self) -> dict[str, Any]:
        """What the manifest records about the choice (``VariantRecord.details``)."""
        out: dict[str, Any] = {"engine_choice": self.reason}
        if self.timings:
            out["engine_timings"] = self.timings
        if self.rejected:
            out["engine_rejected"] = self.rejected
        if self.decision:
            out["engine_decision"] = self.decision
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
    load_before = hostinfo.load_average()
    timings = _timings(sessions, options, sample, batch_size)
    load = max(load_before, hostinfo.load_average())
    cores = int(hostinfo.cpu_info()["cores"])  # type: ignore[call-overload]
    lead = judge(own, {e: t["throughput_rounds"] for e, t in timings.items()}, MIN_GAIN)
    decision = {**lead.record(), "load_average": load, "cores": cores}
    decision["busy"] = hostinfo.busy(load, cores)
    ratio = f"{1 + lead.lead:.2f}x {own}"
    spread = f"{100 * lead.noise:.0f}% spread"
    if lead.verdict == BEYOND_NOISE:
        reason = f"{lead.chosen}: fastest measured ({ratio}, beyond the {spread})"
    elif lead.verdict == WITHIN_NOISE:
        reason = f"{own}: within noise ({lead.fastest} {ratio}, inside the {spread})"
    else:
        reason = f"{own}: fastest measured"
    if decision["busy"]:
        reason += f"; busy host: {busy_phrase(load, cores)}"
        log.warning("engine timings for %s on a busy host (%s)", path, busy_phrase(load, cores))
    best = lead.chosen
    return EngineChoice(best, options[best], qualities[best], reason, timings, rejected, decision)


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


def measure_rounds(
    sessions: Mapping[str, Any],
    sample: Dataset,
    batch_size: int,
    rounds: int = ROUNDS,
    inner_rounds: int = INNER_ROUNDS,
    latency_runs: int = LATENCY_RUNS,
) -> dict[str, list[dict[str, float]]]:
    """``measure_speed``'s result per round, fairer across engines: round-robin over the
    sessions, each timed in its own ``measure_speed`` call (which warms it up first) after a
    short pause. Timing engines run by run in one call is biased: ONNX Runtime's worker threads
    keep spinning after a run and steal the cores from whichever session runs next
    (docs/engines.md has the numbers)."""
    got: dict[str, list[dict[str, float]]] = {name: [] for name in sessions}
    for _ in range(rounds):
        for name, session in sessions.items():
            time.sleep(SETTLE_SECONDS)
            speed = measure_speed(
                {name: session}, sample, batch_size, rounds=inner_rounds, latency_runs=latency_runs
            )
            got[name].append(speed[name])
    return got


def measure_round_robin(
    sessions: Mapping[str, Any],
    sample: Dataset,
    batch_size: int,
    rounds: int = ROUNDS,
    inner_rounds: int = INNER_ROUNDS,
    latency_runs: int = LATENCY_RUNS,
) -> dict[str, dict[str, float]]:
    """:func:`measure_rounds`' medians over the rounds."""
    got = measure_rounds(sessions, sample, batch_size, rounds, inner_rounds, latency_runs)
    return {name: _medians(runs) for name, runs in got.items()}


def _medians(runs: list[dict[str, float]]) -> dict[str, float]:
    return {
        "latency_ms_p50": statistics.median(r["latency_ms_p50"] for r in runs),
        "throughput": statistics.median(r["throughput"] for r in runs),
        "batch_size": runs[0]["batch_size"],
    }


def _timings(
    sessions: Mapping[str, Any],
    options: Mapping[str, dict[str, Any]],
    sample: Dataset,
    batch_size: int,
) -> dict[str, dict[str, Any]]:
    """Per engine: its options, medians, and the per-round throughputs with their summary."""
    got = measure_rounds(sessions, sample, batch_size)
    out: dict[str, dict[str, Any]] = {}
    for name, runs in got.items():
        s = _medians(runs)
        per_round = [round(float(r["throughput"]), 3) for r in runs]
        spread = summary(per_round)
        out[name] = {
            "options": options[name],
            "throughput": round(float(s["throughput"]), 3),
            "latency_ms_p50": round(float(s["latency_ms_p50"]), 4),
            "batch_size": int(s["batch_size"]),
            "throughput_rounds": per_round,
            "throughput_min": spread["min"],
            "throughput_max": spread["max"],
            "spread": spread["spread"],
        }
    return out
