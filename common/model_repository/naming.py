"""Names and paths inside a model repository, the one place both the builder and readers use.

    model_repository/
      <model>.manifest.json        the manifest (common.model_repository.manifest)
      <model>.samples.npz          held-out input rows for clients without the source (labels
                                   under ``__labels__``)
      <model>_<precision>/         one Triton model per variant
        config.pbtxt
        1/model.onnx | model.xml | model.plan
      <llm>_<precision>/           a decoder LLM's variant (python backend, decoupled)
        config.pbtxt
        1/model.py                 common/llm/triton_model.py, copied
        1/genai/                   the onnxruntime-genai folder
"""

from __future__ import annotations

from pathlib import Path

MANIFEST_SUFFIX = ".manifest.json"
SAMPLES_SUFFIX = ".samples.npz"
SAMPLES_LABELS_KEY = "__labels__"
CONFIG_NAME = "config.pbtxt"
VERSION = "1"
MODEL_FILENAME = "model.onnx"
PYTHON_MODEL_FILENAME = "model.py"
GENAI_FOLDER = "genai"


def variant_name(model: str, precision: str) -> str:
    """The Triton model name of one precision variant: ``digits`` + ``int8`` -> ``digits_int8``."""
    return f"{model}_{precision}"


def manifest_path(repository: Path, model: str) -> Path:
    return Path(repository) / f"{model}{MANIFEST_SUFFIX}"


def samples_path(repository: Path, model: str) -> Path:
    return Path(repository) / f"{model}{SAMPLES_SUFFIX}"


def config_path(model_dir: Path) -> Path:
    return Path(model_dir) / CONFIG_NAME
