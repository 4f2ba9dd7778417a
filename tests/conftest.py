"""Session fixtures: repositories built once and shared by every test that needs them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import make_tiny_onnx


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_onnx(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path) -> Path:
    """The tiny classifier built into fp32, fp16 and int8 variants (seconds, no torch)."""
    from builder.pipeline import BuildOptions, build_model

    repo = tmp_path_factory.mktemp("tiny_repository")
    build_model(
        f"onnx:{tiny_onnx}",
        BuildOptions(repository=repo, precisions=["fp32", "fp16", "int8"], progress=False),
    )
    return repo


@pytest.fixture(scope="session")
def digits_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits demo built into fp32, fp16 and int8 (trains once; cached afterwards)."""
    from builder.pipeline import BuildOptions, build_model

    repo = tmp_path_factory.mktemp("digits_repository")
    build_model("digits", BuildOptions(repository=repo, progress=False))
    return repo
