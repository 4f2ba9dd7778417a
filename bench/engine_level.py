"""Engine level: every built variant of a model in-process, on every engine that can run it.

For each variant in the manifest the contenders are the engine the manifest records (what the
gateway and Triton serve, ``served``) and - unless the variant's engine options pin its engine
(the BF16 hint) - every other installed engine with its default CPU options
(``builder.engine_choice.candidates``). The contenders are timed round-robin: in each round every
contender, after a short pause (so the previous engine's spinning threads go idle), is warmed up
and then measured - batch-1 latency, then throughput at each batch size. Latency percentiles pool
every batch-1 run of every round; throughputs are medians over the rounds (each round's value is
the median of its runs; the per-round values are kept, ``throughput_rounds``, for the engine
re-check, :func:`recheck`). Quality: the manifest's (measured by the builder on the full evaluation
set, for the served engine) and, for every contender, the cosine / top-1 agreement of its outputs
to ONNX Runtime FP32 on the bench's sample rows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.stats import median, ms, percentile
from builder.engine_choice import DEFAULT_OPTIONS
from builder.evaluate import cosine_rows
from common.engine_lead import judge
from common.engines import EngineError, available_engines, get_engine
from common.model_repository import Manifest, load_manifest, manifest_path

REFERENCE = ("fp32", "onnxruntime")  # what every ratio is relative to
SETTLE_SECONDS = 0.05


@dataclass
class EngineWindows:
    """How long to measure each contender per round."""

    rounds: int = 3
    latency_runs: int = 30  # batch-1 runs per contender per round, at most...
    latency_seconds: float = 1.5  # ...or until this much time has passed (at least 3 runs)
    throughput_runs: int = 20  # runs per batch size per contender per round, at most...
    throughput_seconds: float = 1.0  # ...or until this much time has passed (at least 1 run)
    quality_rows: int = 32  # sample rows compared with ONNX Runtime FP32


@dataclass
class Contender:
    precision: str
    engine: str
    options: dict[str, Any]
    served: bool  # the engine the manifest records for this variant
    session: Any = None
    error: str | None = None
    latencies: list[float] = field(default_factory=list)
    throughputs: dict[int, list[float]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.precision}/{self.engine}"


def batch_sizes_for(manifest: Manifest, quick: bool = False) -> list[int]:
    """1, 8 and 32 (transformers: 1 and 16), capped by the model's max batch size."""
    wanted = [1, 16] if _is_transformer(manifest) else [1, 8, 32]
    if quick:
        wanted = wanted[:2]
    cap = manifest.max_batch_size if manifest.max_batch_size > 0 else 1
    return sorted({min(b, cap) for b in wanted})


def headline_batch(manifest: Manifest) -> int:
    """The batch the precision targets are stated at: 16 for transformers, else 8."""
    b = 16 if _is_transformer(manifest) else 8
    return min(b, manifest.max_batch_size) if manifest.max_batch_size > 0 else 1


def _is_transformer(manifest: Manifest) -> bool:
    return manifest.task == "embedding" and any(t.dtype == "int64" for t in manifest.inputs)


def load_samples(repository: Path, model: str) -> dict[str, np.ndarray]:
    """The real evaluation rows the builder stores next to the manifest (no labels)."""
    path = Path(repository) / f"{model}.samples.npz"
    with np.load(path) as data:
        return {k: data[k] for k in data.files if not k.startswith("__")}


def rows(samples: Mapping[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    """The first ``n`` sample rows (repeated when there are fewer)."""
    out = {}
    for name, arr in samples.items():
        reps = -(-n // len(arr))
        out[name] = np.ascontiguousarray(np.concatenate([arr] * reps)[:n]) if reps > 1 else arr[:n]
    return out


def contenders_for(manifest: Manifest) -> list[Contender]:
    """The manifest's engine for each variant, then every other installed engine with its
    default options unless the variant's options pin its engine (e.g. the BF16 hint)."""
    engines = available_engines()
    out: list[Contender] = []
    for precision, v in manifest.variants.items():
        opts = dict(v.engine_options)
        out.append(Contender(precision, v.engine, opts, served=True))
        pinned = bool(opts) and opts != DEFAULT_OPTIONS.get(v.engine)
        if pinned and precision != REFERENCE[0]:
            continue
        for engine in engines:
            if engine == v.engine or (pinned and engine != REFERENCE[1]):
                continue
            out.append(Contender(precision, engine, dict(DEFAULT_OPTIONS.get(engine, {})), False))
    return out


def _first_output(session: Any, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
    name = session.outputs[0].name
    return np.asarray(session.run(feeds)[name], dtype=np.float32)


def _timed_runs(fn: Callable[[], Any], max_runs: int, seconds: float, min_runs: int) -> list[float]:
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_runs and time.perf_counter() - start >= seconds:
            break
    return times


def measure_model(
    repository: Path,
    model: str,
    threads: int,
    windows: EngineWindows,
    quick: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every contender of ``model``; returns the JSON-ready result for the model."""
    repo = Path(repository)
    manifest = load_manifest(manifest_path(repo, model))
    samples = load_samples(repo, model)
    sizes = batch_sizes_for(manifest, quick)
    feeds = {b: rows(samples, b) for b in sizes}
    contenders = contenders_for(manifest)
    for c in contenders:
        v = manifest.variants[c.precision]
        try:
            c.session = get_engine(c.engine).load(repo / v.file, c.options, threads)
        except EngineError as e:
            c.error = " ".join(str(e).split())[:300]
            log(f"  {model} {c.key}: cannot load ({c.error[:120]})")
    live = [c for c in contenders if c.session is not None]
    quality = _sample_quality(live, samples, manifest, windows.quality_rows)

    for r in range(windows.rounds):
        order = live[r % len(live) :] + live[: r % len(live)] if live else []
        for c in order:
            time.sleep(SETTLE_SECONDS)
            c.session.run(feeds[1])  # warm-up (first round: also the largest batch)
            if r == 0:
                c.session.run(feeds[sizes[-1]])
            c.latencies += _timed_runs(
                lambda c=c: c.session.run(feeds[1]),
                windows.latency_runs,
                windows.latency_seconds,
                3,
            )
            for b in sizes:
                times = _timed_runs(
                    lambda c=c, b=b: c.session.run(feeds[b]),
                    windows.throughput_runs,
                    windows.throughput_seconds,
                    1,
                )
                c.throughputs.setdefault(b, []).append(median(b / t for t in times))
        log(f"  {model}: round {r + 1}/{windows.rounds} done")

    return _result(manifest, repo, contenders, quality, sizes, threads)


def _sample_quality(
    live: list[Contender], samples: Mapping[str, np.ndarray], manifest: Manifest, n: int
) -> dict[str, dict[str, float]]:
    ref = next((c for c in live if (c.precision, c.engine) == REFERENCE), None)
    if ref is None:
        return {}
    feeds = rows(samples, min(n, len(next(iter(samples.values())))))
    batch = max(1, min(8, manifest.max_batch_size or 1))

    def outputs(c: Contender) -> np.ndarray:
        size = len(next(iter(feeds.values())))
        chunks = [
            _first_output(c.session, {k: v[i : i + batch] for k, v in feeds.items()})
            for i in range(0, size, batch)
        ]
        return np.concatenate(chunks)

    reference = outputs(ref)
    out: dict[str, dict[str, float]] = {}
    for c in live:
        got = reference if c is ref else outputs(c)
        cos = cosine_rows(reference, got)
        q = {
            "cosine_mean": round(float(cos.mean()), 6),
            "cosine_min": round(float(cos.min()), 6),
            "rows": float(len(got)),
        }
        if manifest.task == "classification":
            agree = reference.reshape(len(got), -1).argmax(1) == got.reshape(len(got), -1).argmax(1)
            q["top1_agreement"] = round(float(agree.mean()), 4)
        out[c.key] = q
    return out


def _result(
    manifest: Manifest,
    repo: Path,
    contenders: list[Contender],
    sample_quality: dict[str, dict[str, float]],
    sizes: list[int],
    threads: int,
) -> dict[str, Any]:
    head = headline_batch(manifest)
    rows_out: list[dict[str, Any]] = []
    for c in contenders:
        v = manifest.variants[c.precision]
        row: dict[str, Any] = {
            "precision": c.precision,
            "engine": c.engine,
            "engine_options": c.options,
            "served": c.served,
            "file": v.file,
            "size_bytes": v.size_bytes,
            "size_mb": round(v.size_bytes / 1e6, 2),
            "manifest_quality": {k: val for k, val in v.quality.items() if val is not None},
            "accuracy_loss_points": v.details.get("accuracy_loss"),
            "sample_quality": sample_quality.get(c.key),
        }
        if c.error:
            row["error"] = c.error
        else:
            row["latency_ms_p50"] = ms(percentile(c.latencies, 50))
            row["latency_ms_p99"] = ms(percentile(c.latencies, 99))
            row["latency_samples"] = len(c.latencies)
            row["throughput"] = {str(b): round(median(c.throughputs[b]), 3) for b in sizes}
            row["throughput_rounds"] = {
                str(b): [round(x, 3) for x in c.throughputs[b]] for b in sizes
            }
        rows_out.append(row)
    ref = next(
        (r for r in rows_out if (r["precision"], r["engine"]) == REFERENCE and "throughput" in r),
        None,
    )
    for r in rows_out:
        if ref is not None and "throughput" in r:
            r["ratio_to_ort_fp32"] = {
                b: round(r["throughput"][b] / ref["throughput"][b], 3) for b in r["throughput"]
            }
    return {
        "model": manifest.model,
        "task": manifest.task,
        "accuracy_meaningful": manifest.accuracy_meaningful,
        "batch_sizes": sizes,
        "headline_batch": head,
        "threads": threads,
        "notes": [n for n in manifest.notes if "skipped" in n],
        "contenders": rows_out,
    }


def recheck(result: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per precision, at the headline batch: the ``served`` contender (the manifest's engine),
    the fastest ``other`` engine measured on the same file and its ``ratio`` over the served one,
    and ``after``: the contender the gateway's start-up re-check would serve
    (``common.engine_lead.judge`` on the rounds, the served engine the default; results saved
    without per-round figures count as one round each)."""
    b = str(result["headline_batch"])
    timed = [r for r in result["contenders"] if b in r.get("throughput", {})]
    out: dict[str, dict[str, Any]] = {}
    for served in (r for r in timed if r["served"]):
        others = [r for r in timed if r["precision"] == served["precision"] and not r["served"]]
        other = max(others, key=lambda r: r["throughput"][b], default=None)
        entry: dict[str, Any] = {"served": served, "other": other, "ratio": None, "after": served}
        if other is not None and served["throughput"][b] > 0:
            entry["ratio"] = round(other["throughput"][b] / served["throughput"][b], 3)
            rows = {r["engine"]: r for r in [served, *others]}
            rounds = {
                e: (r.get("throughput_rounds") or {}).get(b) or [r["throughput"][b]]
                for e, r in rows.items()
            }
            lead = judge(served["engine"], rounds)
            entry["after"] = rows[lead.chosen]
            entry["lead"] = lead.record()
            entry["per_round"] = all(r.get("throughput_rounds") for r in rows.values())
        out[served["precision"]] = entry
    return out


def best_served(
    result: Mapping[str, Any], min_cosine: float | None = None
) -> dict[str, Any] | None:
    """The contender served after the engine re-check (:func:`recheck`) with the highest
    throughput at the headline batch, optionally only among those whose quality (manifest
    cosine_mean) reaches ``min_cosine``."""
    b = str(result["headline_batch"])
    best = None
    for entry in recheck(result).values():
        r = entry["after"]
        if min_cosine is not None:
            cos = r["manifest_quality"].get("cosine_mean")
            if cos is None or cos < min_cosine:
                continue
        if best is None or r["throughput"][b] > best["throughput"][b]:
            best = r
    return best
