"""Re-time the variants on this host before ``auto`` ranks them (``--retime auto|always|never``).

The manifest's ``speed`` was measured where the model was built. When this host differs from
the manifest's ``host`` (CPU model, ISA flags, logical cores; ``--retime auto``, the default) or
always (``--retime always``), each model's servable variants are loaded with their engines and
timed here on the repository's samples file (``<model>.samples.npz``): a warm-up run, then
interleaved rounds (the variant order rotates each round, so machine noise hits them alike) of
batch-1 runs and one run at the manifest's speed batch (smaller where :data:`MIN_ROUNDS` rounds
would not fit), while the next round fits in :data:`BUDGET_S` seconds per model (at least one
round, at most :data:`MAX_ROUNDS`). The
medians replace the variants' ``record.speed`` in memory (the manifest file is not touched);
what changed is logged (old vs new ranking) and both sets of figures are exported as metrics
(``precision_serve_variant_speed_rows_per_second`` and ``..._batch1_latency_seconds``, label
``source="manifest|retimed"``).

The engine choice is re-checked at the same time: a variant whose manifest records the
builder's engine timings (``details["engine_timings"]``: engines that passed the builder's
quality gate on that file) is timed on each of those engines too, in the same interleaved rounds,
and where another engine leads the served one beyond the spread of the rounds
(``common.engine_lead.judge``, the builder's rule) this process serves the variant on that
engine (``record.engine`` and ``record.engine_options`` in memory; WARNING log line; the
``precision_serve_variant_engine`` gauge, ``source="served"`` vs ``source="manifest"``).
``--retime auto`` also re-times a model whose manifest says its build host was busy (load
average over its cores while timing, ``host["busy"]``), on any host.

Only the embedded upstream is re-timed: with Triton upstreams the variants run on the
upstream's hosts, which this process cannot time without sending load to them; they keep the
manifest's figures and the log says so. Unbatched models (``max_batch_size`` 0) are skipped too.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.engine_lead import judge
from common.hostinfo import busy_phrase, cpu_info, host_differences
from common.model_repository import SAMPLES_LABELS_KEY, samples_path
from server import metrics
from server.catalog import Model, Repository
from server.errors import ConfigError

log = logging.getLogger(__name__)

RETIME_MODES = ("auto", "always", "never")
BUDGET_S = 3.0  # seconds of timing rounds per model (after loading and a warm-up run each)
MIN_ROUNDS = 2  # the throughput batch shrinks so that this many rounds fit in the budget
MAX_ROUNDS = 30
LATENCY_RUNS = 3  # batch-1 runs per variant per round
DEFAULT_BATCH = 8  # when the manifest records no speed batch


@dataclass
class Retimed:
    """One model's outcome: the figures before (manifest) and after (this host), or why not."""

    model: str
    why: str  # the host differences / "--retime always", or why it was skipped
    before: dict[str, dict[str, float]] = field(default_factory=dict)
    after: dict[str, dict[str, float]] = field(default_factory=dict)
    rounds: int = 0
    # precision -> the engine re-check (common.engine_lead.Lead.record() plus options)
    engines: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def switched(self) -> dict[str, dict[str, Any]]:
        """The re-checked variants served on another engine than the manifest's."""
        return {p: e for p, e in self.engines.items() if e["chosen"] != e["default"]}

    @property
    def retimed(self) -> bool:
        return bool(self.after)


def check_mode(mode: str) -> str:
    if mode not in RETIME_MODES:
        raise ConfigError(f"--retime must be one of {', '.join(RETIME_MODES)}, got {mode!r}")
    return mode


def speed_order(speeds: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Precisions fastest first, by auto's rule: batch-1 p50 latency, else 1/throughput;
    those without figures last."""

    def key(p: str) -> tuple[int, float]:
        s = speeds[p]
        if s.get("latency_ms_p50"):
            return (0, float(s["latency_ms_p50"]))
        if s.get("throughput"):
            return (0, 1000.0 / float(s["throughput"]))
        return (1, 0.0)

    return sorted(speeds, key=key)


# (sessions by key, samples, batch) -> (speeds by key, rounds, per-round throughputs by key)
Timer = Callable[
    [Mapping[str, Any], Mapping[str, np.ndarray], int],
    tuple[dict[str, dict[str, float]], int, dict[str, list[float]]],
]


def retime_repository(
    repository: Repository,
    mode: str = "auto",
    upstream: str = "embedded",
    threads: int = 0,
    timer: Timer | None = None,
) -> list[Retimed]:
    """Re-time what ``mode`` asks for (module docstring); updates ``record.speed`` (and, on a
    re-checked engine choice, ``record.engine``/``engine_options``) in memory. ``timer``:
    :func:`time_sessions` unless a test injects one."""
    check_mode(mode)
    out: list[Retimed] = []
    for model in repository.models.values():
        _export(model, "manifest", {p: v.record.speed for p, v in model.variants.items()})
        _export_engines(model, "manifest")
    if mode == "never":
        _export_all_engines(repository)
        return out
    here = cpu_info()
    for model in repository.models.values():
        differences = host_differences(model.manifest.host, here)
        if model.manifest.host.get("busy"):
            load = float(model.manifest.host.get("load_average") or 0.0)
            cores = int(model.manifest.host.get("cores") or 1)
            differences.append(f"the build host was busy ({busy_phrase(load, cores)})")
        if mode == "auto" and not differences:
            log.debug("re-timing %s skipped: built on this kind of host", model.name)
            continue
        why = "; ".join(differences) if differences else "--retime always"
        if upstream != "embedded":
            log.warning(
                "re-timing %s skipped (%s): the upstream %s runs the variants on its own hosts; "
                "auto ranks by the manifest's speeds",
                model.name,
                why,
                upstream,
            )
            out.append(Retimed(model.name, f"skipped: upstream {upstream}"))
            continue
        result = _retime_model(repository, model, why, threads, timer or time_sessions)
        out.append(result)
        if result.retimed:
            _apply(model, result)
    _export_all_engines(repository)
    return out


def alternatives(record: Any) -> dict[str, dict[str, Any]]:
    """The other engines the builder timed this variant on and found good enough (its
    ``details["engine_timings"]``, engine -> options); empty when not measured or pinned."""
    timings = record.details.get("engine_timings") or {}
    return {
        engine: dict(t.get("options") or {})
        for engine, t in timings.items()
        if engine != record.engine and isinstance(t, Mapping)
    }


def recheck_engine(
    served: str, rounds: Mapping[str, list[float]], options: Mapping[str, dict[str, Any]]
) -> dict[str, Any]:
    """The engine re-check of one variant from each engine's per-round throughputs on this
    host: ``common.engine_lead.judge`` with the served engine as the default."""
    lead = judge(served, rounds)
    return {**lead.record(), "options": dict(options[lead.chosen]), "why": lead.describe()}


def _samples(repository: Repository, model: Model) -> dict[str, np.ndarray] | str:
    path = samples_path(repository.root, model.name)
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files if k != SAMPLES_LABELS_KEY}
    except (OSError, ValueError) as e:
        return f"no usable samples file {path.name} ({e})"
    reference = model.reference()
    missing = [t.name for t in reference.inputs if t.name not in arrays]
    if missing:
        return f"samples file {path.name} lacks input(s) {', '.join(missing)}"
    return {t.name: arrays[t.name].astype(t.dtype, copy=False) for t in reference.inputs}


def _key(precision: str, engine: str) -> str:
    return f"{precision}@{engine}"


def _retime_model(
    repository: Repository, model: Model, why: str, threads: int, timer: Timer
) -> Retimed:
    from common.engines import EngineError, get_engine

    result = Retimed(model.name, why)
    if model.reference().max_batch_size <= 0:
        result.why = "skipped: unbatched model"
        log.warning("re-timing %s skipped (%s): unbatched model", model.name, why)
        return result
    samples = _samples(repository, model)
    if isinstance(samples, str):
        result.why = f"skipped: {samples}"
        log.warning("re-timing %s skipped (%s): %s", model.name, why, samples)
        return result
    sessions: dict[str, Any] = {}
    others: dict[str, dict[str, dict[str, Any]]] = {}  # precision -> engine -> options
    for precision, v in model.variants.items():
        if v.problem:
            continue
        try:
            sessions[precision] = get_engine(v.record.engine).load(
                v.path, v.record.engine_options, threads
            )
        except EngineError as e:
            log.warning("re-timing %s: %s not loaded: %s", model.name, v.name, e)
            continue
        for engine, options in alternatives(v.record).items():
            try:
                sessions[_key(precision, engine)] = get_engine(engine).load(
                    v.path, options, threads
                )
                others.setdefault(precision, {})[engine] = options
            except EngineError as e:
                log.warning(
                    "re-checking %s: %s not loaded on %s: %s", model.name, v.name, engine, e
                )
    if not sessions:
        result.why = "skipped: no variant loads"
        return result
    batch = _batch_size(model, samples)
    speeds, result.rounds, per_round = timer(sessions, samples, batch)
    result.after = {p: speeds[p] for p in sessions if p in model.variants}
    for precision, engines in others.items():
        record = model.variants[precision].record
        rounds = {record.engine: per_round[precision]}
        rounds.update({e: per_round[_key(precision, e)] for e in engines})
        options = {record.engine: dict(record.engine_options), **engines}
        check = recheck_engine(record.engine, rounds, options)
        result.engines[precision] = check
        if check["chosen"] != record.engine:
            result.after[precision] = dict(speeds[_key(precision, check["chosen"])])
    _relative_to_fp32(result.after)
    result.before = {p: dict(model.variants[p].record.speed) for p in result.after}
    return result


def _batch_size(model: Model, samples: Mapping[str, np.ndarray]) -> int:
    recorded = [v.record.speed.get("batch_size") for v in model.variants.values()]
    want = int(next((b for b in recorded if b), DEFAULT_BATCH))
    rows = len(next(iter(samples.values())))
    return max(1, min(want, rows, model.reference().max_batch_size))


def time_sessions(
    sessions: Mapping[str, Any], samples: Mapping[str, np.ndarray], batch: int
) -> tuple[dict[str, dict[str, float]], int, dict[str, list[float]]]:
    """Interleaved rounds over ``sessions`` (module docstring): medians per session, the number
    of rounds, and each session's per-round throughputs."""
    one = {k: v[:1] for k, v in samples.items()}
    cost = 0.0  # seconds of one batch-1 run of every variant, after a first (warm-up) run
    for s in sessions.values():
        s.run(one)
        t0 = time.perf_counter()
        s.run(one)
        cost += time.perf_counter() - t0
    batch = _fitting_batch(batch, cost)
    many = {k: v[:batch] for k, v in samples.items()}
    rows = len(next(iter(many.values())))
    lat: dict[str, list[float]] = {p: [] for p in sessions}
    thr: dict[str, list[float]] = {p: [] for p in sessions}
    order = list(sessions)
    started, rounds = time.perf_counter(), 0
    round_cost = cost * (LATENCY_RUNS + rows)
    while rounds == 0 or (
        rounds < MAX_ROUNDS and time.perf_counter() - started + round_cost <= BUDGET_S
    ):
        for p in order:
            s = sessions[p]
            for _ in range(LATENCY_RUNS):
                t0 = time.perf_counter()
                s.run(one)
                lat[p].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s.run(many)
            thr[p].append(rows / (time.perf_counter() - t0))
        order = order[1:] + order[:1]
        rounds += 1
        round_cost = (time.perf_counter() - started) / rounds
    speeds = {
        p: {
            "latency_ms_p50": round(1000 * statistics.median(lat[p]), 4),
            "throughput": round(statistics.median(thr[p]), 3),
            "batch_size": float(rows),
        }
        for p in sessions
    }
    return speeds, rounds, {p: [round(x, 3) for x in thr[p]] for p in sessions}


def _relative_to_fp32(speeds: dict[str, dict[str, float]]) -> None:
    if "fp32" in speeds:
        for s in speeds.values():
            s["speedup_vs_fp32"] = round(s["throughput"] / speeds["fp32"]["throughput"], 3)


def _fitting_batch(want: int, cost: float) -> int:
    """The throughput batch: the manifest's, smaller where a round (LATENCY_RUNS batch-1 runs
    and one batch run of every variant, ~ ``cost`` per row) would not fit twice in the budget."""
    if cost <= 0:
        return want
    fits = int(BUDGET_S / MIN_ROUNDS / cost) - LATENCY_RUNS
    return max(1, min(want, fits))


def _apply(model: Model, result: Retimed) -> None:
    for precision, speed in result.after.items():
        model.variants[precision].record.speed = dict(speed)
    engines = []  # the re-check, one phrase per variant
    for precision, check in result.engines.items():
        record = model.variants[precision].record
        if check["chosen"] == record.engine:
            engines.append(f"{precision} stays on {record.engine} ({check['why']})")
            continue
        engines.append(
            f"{precision} moved from {record.engine} to {check['chosen']} in this process "
            f"({check['why']})"
        )
        record.engine, record.engine_options = check["chosen"], dict(check["options"])
    _export(model, "retimed", result.after)
    before, after = speed_order(result.before), speed_order(result.after)
    figures = ", ".join(f"{p} {_ms(result.before[p])} -> {_ms(result.after[p])}" for p in after)
    changed = before != after
    (log.warning if changed or result.switched else log.info)(
        "re-timed %s on this host (%s; %d rounds): ranking %s %s (manifest) %s %s; "
        "batch-1 p50 %s%s",
        model.name,
        result.why,
        result.rounds,
        "changed from" if changed else "unchanged:",
        " < ".join(before),
        "to" if changed else "=",
        " < ".join(after),
        figures,
        f"; engines re-checked: {'; '.join(engines)}" if engines else "",
    )


def _ms(speed: Mapping[str, float]) -> str:
    value = speed.get("latency_ms_p50")
    return "?" if not value else f"{float(value):.3g} ms"


def _export(model: Model, source: str, speeds: Mapping[str, Mapping[str, float]]) -> None:
    for precision, s in speeds.items():
        if s.get("throughput"):
            metrics.variant_speed(model.name, precision, source).set(float(s["throughput"]))
        if s.get("latency_ms_p50"):
            metrics.variant_latency(model.name, precision, source).set(
                float(s["latency_ms_p50"]) / 1000.0
            )


def _export_engines(model: Model, source: str) -> None:
    """1 for each variant's engine, 0 for the other engines it was timed on (re-set each time,
    so a series never keeps an engine the variant left)."""
    for precision, v in model.variants.items():
        for engine in {v.record.engine, *alternatives(v.record)}:
            value = 1 if engine == v.record.engine else 0
            metrics.variant_engine(model.name, precision, engine, source).set(value)


def _export_all_engines(repository: Repository) -> None:
    """The engine each variant is served on in this process (``source="served"``)."""
    for model in repository.models.values():
        _export_engines(model, "served")
