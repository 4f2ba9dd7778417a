"""Fixtures for the gateway tests.

``tiny_repository`` (tests/conftest.py) is the tiny classifier built by the real pipeline into
fp32/fp16/int8. ``routing_repo`` is a copy whose manifest gets fixed speed / accuracy-loss
records (and labelled-data provenance, so the figures count as evidence), so the ``auto``
policy has a known answer. ``gateway`` is one gateway subprocess shared
by a test module.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from common.model_repository import LABELLED, load_manifests
from server.runtime.runner import GatewayProcess

# speed (ms) and accuracy loss (points) written into routing_repo's manifest
SPEED = {"fp32": 0.05, "fp16": 0.08, "int8": 0.03}
LOSS = {"fp32": 0.0, "fp16": 0.0, "int8": 0.5}


def copy_repository(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def routing_repo(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = copy_repository(tiny_repository, tmp_path_factory.mktemp("routing") / "repo")
    manifest = load_manifests(repo)["tiny"]
    for precision, v in manifest.variants.items():
        v.speed = {"latency_ms_p50": SPEED[precision]}
        v.details["accuracy_loss"] = LOSS[precision]
        v.quality_source = LABELLED
    manifest.save(repo)
    return repo


@pytest.fixture
def repo_copy(tiny_repository: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny repository that a test may damage."""
    return copy_repository(tiny_repository, tmp_path / "repo")


@pytest.fixture(scope="module")
def gateway(tiny_repository: Path):
    with GatewayProcess(tiny_repository, extra_args=["--max-request-bytes", "65536"]) as gw:
        yield gw


def ort_outputs(repo: Path, precision: str, x: np.ndarray) -> np.ndarray:
    """Direct ONNX Runtime output of a tiny variant (the reference for gateway answers)."""
    import onnxruntime as ort

    path = repo / f"tiny_{precision}" / "1" / "model.onnx"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"x": x})[0]


def rows(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 16)).astype(np.float32)
