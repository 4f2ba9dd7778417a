"""Fixtures for the load-test and observability tests (the Triton ones come from tests/triton)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import skip_or_fail
from tests.loadtest.promserver import find_prometheus
from tests.triton.conftest import start_triton, triton_distribution  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    binary = find_prometheus()
    if binary is None:
        skip_or_fail("the prometheus binary is not installed (Debian package prometheus)")
    return binary  # type: ignore[return-value]


@pytest.fixture(scope="session")
def tiny_llm_repository(
    tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_llama_genai: Path
) -> Path:
    """A repository with the tiny random Llama as LLM ``tinyllm`` at fp32 and int4, its manifest
    declaring an LLM (task ``llm``) with quality records, as the builder writes them."""
    from common.model_repository import load_manifest, manifest_path
    from tests.llm import genai_export
    from tests.server.llm_repo import write_llm_repository

    tmp = tmp_path_factory.mktemp("tiny_llm")
    int4 = genai_export(tiny_llama, tmp / "int4", "int4")
    repo = write_llm_repository(tmp / "repo", "tinyllm", {"fp32": tiny_llama_genai, "int4": int4})
    path = manifest_path(repo, "tinyllm")
    manifest = load_manifest(path)
    manifest.task = "llm"
    manifest.save(repo)
    return repo
