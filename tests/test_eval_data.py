"""``precision-build --eval-data``: quality figures, the budget search and the engine choice are
measured on the given rows, and the manifest says where each figure came from.

The model is the tiny classifier; its "real" inputs have ~50x the spread of the seeded noise the
onnx: source calibrates INT8 on, so static INT8 (calibrated on noise) saturates on them: it
agrees with fp32 on noise and collapses on the real rows.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builder.cli import main
from common.model_repository import (
    LABELLED,
    SAMPLES_LABELS_KEY,
    SYNTHETIC,
    UNLABELLED,
    load_manifests,
    samples_path,
)
from server.catalog import load_repository
from server.routing.policies import Router, parse_routing
from tests.helpers import make_tiny_onnx

pytestmark = pytest.mark.integration

REAL_SCALE = 50.0


def _real_rows(model: Path, n: int = 64) -> tuple[np.ndarray, np.ndarray]:
    import onnxruntime as ort

    x = (np.random.default_rng(5).normal(0, 1, (n, 16)) * REAL_SCALE).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return x, session.run(None, {"x": x})[0].argmax(axis=1)  # labels: what fp32 answers


def _build(model: Path, repo: Path, *extra: str) -> int:
    args = [f"onnx:{model}", "--precisions", "fp32,int8", "--no-speed", "--quiet"]
    return main([*args, "--repository", str(repo), *extra])


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("eval_data")
    model = make_tiny_onnx(base / "tiny.onnx")
    x, labels = _real_rows(model)
    labelled = base / "labelled"
    labelled.mkdir()
    np.savez(labelled / "rows.npz", x=x, labels=labels)
    assert _build(model, base / "noise") == 0
    assert _build(model, base / "real", "--eval-data", str(labelled)) == 0
    return {
        "model": model,
        "x": x,
        "labels": labels,
        "noise": base / "noise",
        "real": base / "real",
    }


def _int8(repo: Path):
    return load_manifests(repo)["tiny"].variants["int8"]


def test_eval_data_replaces_the_noise_the_figures_were_measured_on(builds) -> None:
    noise, real = _int8(builds["noise"]), _int8(builds["real"])
    assert noise.quality_source == SYNTHETIC and noise.quality["accuracy"] is None
    assert noise.details["accuracy_loss"] < 2.0  # int8 agrees with fp32 on noise
    assert real.quality_source == LABELLED
    assert real.quality["samples"] == len(builds["x"])
    assert real.quality["accuracy"] < 0.9  # ... and collapses on the real rows
    assert real.details["accuracy_loss"] > 10.0
    assert load_manifests(builds["real"])["tiny"].variants["fp32"].quality["accuracy"] == 1.0
    # the repository's samples file (what clients and the re-timing send) is the given rows
    with np.load(samples_path(builds["real"], "tiny")) as z:
        np.testing.assert_array_equal(z["x"], builds["x"])
        np.testing.assert_array_equal(z[SAMPLES_LABELS_KEY], builds["labels"])


def _auto(repo: Path, tmp_path: Path, **route: object) -> str:
    """auto's choice for the built figures, with int8 recorded as the fastest variant."""
    import shutil

    copy = tmp_path / f"copy-{repo.name}-{len(route)}"
    shutil.copytree(repo, copy)
    manifest = load_manifests(copy)["tiny"]
    for precision, v in manifest.variants.items():
        v.speed = {"latency_ms_p50": 0.01 if precision == "int8" else 0.05}
    manifest.save(copy)
    doc = {"models": {"tiny": {"policy": "auto", "accuracy_budget": 5.0, **route}}}
    return Router(load_repository(copy), parse_routing(doc)).decide("tiny").precision


def test_auto_follows_the_real_figures(builds, tmp_path: Path) -> None:
    # on noise figures auto would take int8 only when told to trust them ...
    assert _auto(builds["noise"], tmp_path, accept_synthetic_quality=True) == "int8"
    assert _auto(builds["noise"], tmp_path) == "fp32"
    # ... on the real rows int8 is out of budget, whatever the routing file accepts
    assert _auto(builds["real"], tmp_path) == "fp32"
    assert _auto(builds["real"], tmp_path, accept_synthetic_quality=True) == "fp32"


def test_summary_prints_where_quality_came_from(builds, tmp_path: Path, capsys) -> None:
    unlabelled = tmp_path / "unlabelled"
    unlabelled.mkdir()
    np.save(unlabelled / "rows.npy", builds["x"])
    capsys.readouterr()
    assert _build(builds["model"], tmp_path / "repo", "--eval-data", str(unlabelled)) == 0
    out = capsys.readouterr().out
    assert f"quality measured on: {UNLABELLED} (fp32, int8)" in out
    assert _int8(tmp_path / "repo").quality_source == UNLABELLED
    assert _int8(tmp_path / "repo").quality["accuracy"] is None


def test_budget_search_measures_on_eval_data(builds, tmp_path: Path) -> None:
    labelled = tmp_path / "labelled"
    labelled.mkdir()
    np.save(labelled / "rows.npy", builds["x"])
    np.save(labelled / "labels.npy", builds["labels"])  # labels as a file next to the rows
    repo = tmp_path / "repo"
    budget = ["--accuracy-budget", "5", "--keep-over-budget", "--force"]
    assert _build(builds["model"], repo, *budget) == 0  # on noise: met, nothing kept
    int8 = _int8(repo)
    assert int8.details["budget_met"] is True and int8.details["fp32_kept_nodes"] == []
    assert _build(builds["model"], repo, "--eval-data", str(labelled), *budget) == 0
    int8 = _int8(repo)
    first = int8.details["budget_attempts"][0]  # the fully quantized candidate
    assert first["kept"] == 0 and first["accuracy_loss"] > 10.0  # judged on the real rows
    assert len(int8.details["budget_attempts"]) > 1  # so the search kept layers FP32
    assert int8.details["budget_met"] is False  # (only keeping every layer met it)


def test_bad_eval_data_is_one_line_and_exit_2(builds, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    np.savez(bad / "rows.npz", x=builds["x"], labels=builds["labels"][:10])
    capsys.readouterr()
    assert _build(builds["model"], tmp_path / "repo", "--eval-data", str(bad)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "evaluation data" in err and "10 labels for 64 rows" in err
