"""The issue's must-show figures on the built-in demo models (real builds, real data)."""

from __future__ import annotations

from pathlib import Path

import pytest

from builder.pipeline import BuildOptions, build_model
from common.model_repository import load_manifests

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_digits_accuracy_per_precision(digits_repository: Path) -> None:
    m = load_manifests(digits_repository)["digits"]
    assert set(m.variants) >= {"fp32", "fp16", "int8"}
    acc = {p: 100 * v.quality["accuracy"] for p, v in m.variants.items()}
    assert acc["fp32"] >= 97.0, acc
    assert acc["fp32"] - acc["int8"] <= 0.5, acc
    assert acc["fp32"] - acc["fp16"] <= 0.1, acc
    assert m.variants["int8"].details["calibration_samples"] > 0
    assert m.variants["int8"].quality["samples"] >= 300  # the held-out split, real labels


def test_resnet50_file_sizes(tmp_path: Path) -> None:
    m = build_model(
        "resnet50",
        BuildOptions(
            repository=tmp_path,
            precisions=["fp32", "fp16", "int8"],
            calibration_samples=8,
            measure_speed=False,
            progress=False,
        ),
    )
    fp32 = m.variants["fp32"].size_bytes
    assert fp32 > 90e6  # ResNet-50's ~25.6M parameters
    assert m.variants["int8"].size_bytes <= 0.30 * fp32
    assert m.variants["fp16"].size_bytes <= 0.52 * fp32
    assert m.accuracy_meaningful is False
    assert any("not meaningful" in n for n in m.notes)


def test_minilm_int8_dynamic_keeps_embeddings(tmp_path: Path) -> None:
    m = build_model(
        "minilm",
        BuildOptions(repository=tmp_path, measure_speed=False, progress=False),
    )
    assert "int8-dynamic" in m.variants  # the transformer default INT8
    int8 = m.variants["int8-dynamic"].quality
    assert int8["cosine_mean"] >= 0.98, int8
    assert int8["samples"] >= 100  # held-out real sentences
    assert m.variants["fp16"].quality["cosine_mean"] >= 0.999
