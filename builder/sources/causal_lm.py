"""Which Hugging Face folders are decoder LLMs, and which of those onnxruntime-genai builds.

Read from the folder's ``config.json`` only (no torch, no transformers): the ``hf:`` source
declares both kinds (builder.sources.base.SourceCapabilities) and asks here which one a folder is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from builder.errors import SourceError

# The decoder-only ``*ForCausalLM`` architectures onnxruntime-genai 0.18's model builder
# dispatches on (onnxruntime_genai/models/builder.py, create_model).
GENAI_CAUSAL_LMS = frozenset(
    {
        "Ernie4_5ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "GptOssForCausalLM",
        "GraniteForCausalLM",
        "HunYuanDenseV1ForCausalLM",
        "InternLM2ForCausalLM",
        "Lfm2ForCausalLM",
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "NemotronForCausalLM",
        "OlmoForCausalLM",
        "PhiForCausalLM",
        "Phi3ForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "SmolLM3ForCausalLM",
    }
)
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def read_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise SourceError(f"{folder} is not a Hugging Face model folder (no config.json)") from e
    except ValueError as e:
        raise SourceError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise SourceError(f"{path} is not a JSON object")
    return config


def architectures(config: dict[str, Any]) -> list[str]:
    found = config.get("architectures") or []
    return [a for a in found if isinstance(a, str)] if isinstance(found, list) else []


def is_causal_lm(config: dict[str, Any]) -> bool:
    """The folder's config names a text-generation head (``*ForCausalLM``, ``*LMHeadModel``)."""
    return any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures(config))


def genai_architecture(folder: Path) -> str:
    """The architecture onnxruntime-genai will build, or a SourceError naming why not."""
    config = read_config(folder)
    names = architectures(config)
    if not is_causal_lm(config):
        raise SourceError(
            f"{folder} is not a causal language model (architectures {names or 'missing'} in "
            "config.json; a decoder LLM has one ending in ForCausalLM)"
        )
    if names[0] not in GENAI_CAUSAL_LMS:
        raise SourceError(
            f"{folder}: onnxruntime-genai's model builder does not build {names[0]}; it builds "
            f"{', '.join(sorted(GENAI_CAUSAL_LMS))}"
        )
    return names[0]
