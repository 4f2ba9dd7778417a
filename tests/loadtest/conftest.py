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
    declaring an LLM (task ``llm``) with quality records as the builder writes them (measured
    here by the builder's own quality code on its evaluation text, two short windows)."""
    from builder.llm.quality import compare, eval_text, log_probs, token_windows
    from common.llm import GenaiModel
    from common.model_repository import (
        LLM_TASK,
        LlmModelRecord,
        LlmVariantRecord,
        load_manifest,
        manifest_path,
    )
    from tests.llm import genai_export
    from tests.server.llm_repo import write_llm_repository

    tmp = tmp_path_factory.mktemp("tiny_llm")
    int4 = genai_export(tiny_llama, tmp / "int4", "int4")
    repo = write_llm_repository(tmp / "repo", "tinyllm", {"fp32": tiny_llama_genai, "int4": int4})
    path = manifest_path(repo, "tinyllm")
    manifest = load_manifest(path)
    manifest.task = LLM_TASK
    text = eval_text(None)
    reference = None
    for precision in ("fp32", "int4"):
        model = GenaiModel(repo / manifest.variants[precision].file, threads=1)
        windows = token_windows(model, text.text, window=32, max_windows=2)
        logp = log_probs(model, windows)
        reference = reference or logp
        q = compare(reference, logp, windows)
        manifest.variants[precision].llm = LlmVariantRecord(
            ppl=q.ppl, ppl_ratio=q.ppl_ratio, kl_mean=q.kl_mean,
            top1_agreement=q.top1_agreement, eval_tokens=q.eval_tokens,
        )  # fmt: skip
    manifest.llm = LlmModelRecord("LlamaForCausalLM", 2048, text.description, eval_window=32)
    manifest.save(repo)
    return repo
