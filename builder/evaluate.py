"""Quality of a variant against the FP32 reference, and its speed on this host."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from builder.sources.base import Dataset
from builder.sources.common import is_synthetic
from common.engines import EngineSession, get_engine
from common.model_repository import LABELLED, SYNTHETIC, UNLABELLED

EVAL_BATCH = 32


def run_dataset(session: EngineSession, data: Dataset, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """The first output of ``session`` over every row of ``data``, as float32."""
    first = session.outputs[0].name
    chunks = [np.asarray(session.run(b)[first], dtype=np.float32) for b in data.batches(batch_size)]
    return np.concatenate(chunks, axis=0)


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).astype(np.float64)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = _rows(a), _rows(b)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)


def nearest_neighbours(x: np.ndarray) -> np.ndarray:
    """Index of each row's nearest other row by cosine similarity."""
    r = _rows(x)
    r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-30)
    sim = r @ r.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def compare(
    task: str, reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray | None
) -> dict[str, float | None]:
    """Quality of ``candidate`` outputs vs the FP32 ``reference`` outputs (and labels)."""
    finite = bool(np.isfinite(candidate).all())
    cos = cosine_rows(reference, candidate)
    out: dict[str, float | None] = {
        "cosine_mean": float(np.nan_to_num(cos.mean(), nan=0.0)),
        "cosine_min": float(np.nan_to_num(cos.min(), nan=0.0)),
        "max_abs_error": float(np.nan_to_num(np.abs(reference - candidate).max(), nan=np.inf)),
        "finite": float(finite),
        "samples": float(len(reference)),
    }
    if task == "classification":
        ref_top1 = _rows(reference).argmax(axis=1)
        top1 = _rows(candidate).argmax(axis=1)
        out["top1_agreement"] = float((ref_top1 == top1).mean())
        out["accuracy"] = None if labels is None else float((top1 == labels).mean())
    else:
        if len(reference) > 2:
            same = nearest_neighbours(reference) == nearest_neighbours(candidate)
            out["nn_agreement"] = float(same.mean())
        out["accuracy"] = None
    return out


def accuracy_loss(task: str, fp32: Mapping[str, Any], variant: Mapping[str, Any]) -> float:
    """Loss vs FP32 in points (0..100): accuracy points where labels exist, else
    (1 - top-1 agreement) for classifiers and (1 - mean cosine) for embeddings, x100."""
    if not variant.get("finite", 1.0):
        return 100.0
    if task == "classification":
        if fp32.get("accuracy") is not None and variant.get("accuracy") is not None:
            return max(0.0, 100.0 * (fp32["accuracy"] - variant["accuracy"]))
        return 100.0 * (1.0 - float(variant.get("top1_agreement") or 0.0))
    return 100.0 * (1.0 - float(variant.get("cosine_mean") or 0.0))


def quality_source(task: str, evaluation: Dataset) -> str:
    """What the quality figures measured on ``evaluation`` rest on (manifest
    ``quality_source``): seeded noise, real rows with labels (classifiers: accuracy is
    measured), or real rows without (agreement and cosine only)."""
    if is_synthetic(evaluation):
        return SYNTHETIC
    if evaluation.labels is not None and task == "classification":
        return LABELLED
    return UNLABELLED


class Evaluator:
    """Runs models over the evaluation set and compares them with the FP32 reference."""

    def __init__(
        self,
        task: str,
        evaluation: Dataset,
        fp32_path: Path,
        threads: int = 0,
        batch_size: int = EVAL_BATCH,
    ) -> None:
        self.task = task
        self.data = evaluation
        self.threads = threads
        self.batch_size = batch_size
        self.reference = self.outputs(fp32_path, "onnxruntime", {})
        self.fp32_quality = compare(task, self.reference, self.reference, evaluation.labels)

    def outputs(self, path: Path, engine: str, options: Mapping[str, Any]) -> np.ndarray:
        session = get_engine(engine).load(path, options, self.threads)
        return run_dataset(session, self.data, self.batch_size)

    def quality(
        self, path: Path, engine: str = "onnxruntime", options: Mapping[str, Any] | None = None
    ) -> dict[str, float | None]:
        out = compare(
            self.task, self.reference, self.outputs(path, engine, options or {}), self.data.labels
        )
        out["accuracy_loss"] = accuracy_loss(self.task, self.fp32_quality, out)
        return out


def measure_speed(
    sessions: Mapping[str, EngineSession],
    sample: Dataset,
    batch_size: int,
    rounds: int = 5,
    latency_runs: int = 10,
) -> dict[str, dict[str, float]]:
    """Batch-1 latency p50 and throughput at ``batch_size``, interleaving the contenders
    round by round so that machine noise hits them alike. Medians over rounds."""
    one = next(sample.take(1).batches(1))
    batch = next(sample.take(batch_size).batches(batch_size))
    rows = len(next(iter(batch.values())))
    lat: dict[str, list[float]] = {k: [] for k in sessions}
    thr: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():  # warm-up
        s.run(one)
        s.run(batch)
    for _ in range(rounds):
        for name, s in sessions.items():
            for _ in range(max(1, latency_runs // rounds)):
                t0 = time.perf_counter()
                s.run(one)
                lat[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s.run(batch)
            thr[name].append(rows / (time.perf_counter() - t0))
    return {
        name: {
            "latency_ms_p50": 1000 * statistics.median(lat[name]),
            "throughput": statistics.median(thr[name]),
            "batch_size": float(rows),
        }
        for name in sessions
    }
