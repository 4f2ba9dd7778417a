"""An LLM model repository for the gateway tests, laid out as the builder writes one
(the layout of docs/llm.md: ``<model>_<precision>/config.pbtxt`` python backend, decoupled;
``1/genai/`` the onnxruntime-genai folder; the manifest's engine ``onnxruntime-genai``), from
the tiny random Llama's genai exports (tests/llm.py). Written with common/model_repository's
helpers; no Triton python model file (the embedded upstream does not need one)."""

from __future__ import annotations

import shutil
from pathlib import Path

from common.model_repository import (
    Manifest,
    ServingOptions,
    TensorSpec,
    VariantRecord,
    build_model_config,
    variant_name,
    write_config,
)
from server.catalog import LLM_ENGINE

INPUTS = [
    TensorSpec("text_input", "object", [1]),
    TensorSpec("stream", "bool", [1]),
    TensorSpec("sampling_parameters", "object", [1]),
    TensorSpec("exclude_input_in_output", "bool", [1]),
]
OUTPUTS = [
    TensorSpec("text_output", "object", [1]),
    TensorSpec("finish_reason", "object", [1]),
    TensorSpec("num_input_tokens", "uint32", [1]),
    TensorSpec("num_output_tokens", "uint32", [1]),
]


def write_llm_repository(repo: Path, model: str, genai: dict[str, Path]) -> Path:
    """``repo`` with one LLM ``model`` whose variants are the genai folders by precision."""
    repo.mkdir(parents=True, exist_ok=True)
    variants = {}
    for precision, folder in genai.items():
        name = variant_name(model, precision)
        shutil.copytree(folder, repo / name / "1" / "genai")
        serving = ServingOptions(max_batch_size=0, dynamic_batching=False, warmup=False)
        cfg = build_model_config(name, INPUTS, OUTPUTS, serving, platform="", backend="python")
        cfg.model_transaction_policy.decoupled = True
        for t in cfg.input[1:]:
            t.optional = True
        write_config(repo / name, cfg)
        variants[precision] = VariantRecord(
            precision=precision, triton_name=name, file=f"{name}/1/genai", engine=LLM_ENGINE
        )
    Manifest(
        model=model,
        source="tests: tiny random Llama",
        task="text-generation",
        inputs=INPUTS,
        outputs=OUTPUTS,
        max_batch_size=0,
        accuracy_meaningful=False,
        variants=variants,
    ).save(repo)
    return repo
