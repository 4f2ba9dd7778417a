"""The decoder-LLM precisions: onnxruntime-genai builder recipes (builder/llm/genai_build.py).

On CPU onnxruntime-genai builds fp32, int8 and int4 (MatMulNBits weight-only quantization,
symmetric blocks); fp16 and bf16 need its CUDA build (``onnxruntime-genai-cuda``, behind the
``gpu`` extra), which never runs on this project's CPU hosts: asked for here, they are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from builder.errors import BuildError
from builder.llm.genai_build import GenaiRecipe
from builder.precisions.int4_options import Int4Options

CPU_PRECISIONS = ("fp32", "int8", "int4")
CUDA_PRECISIONS = ("fp16", "bf16")


@dataclass(frozen=True)
class LlmPrecisionOptions:
    """The ``precision-build`` options an LLM build honours: ``--int4-block-size`` (the
    MatMulNBits block of int4). int4 is symmetric (onnxruntime-genai's default; its asymmetric
    form, ``is_symmetric=false``, builds models that fail to load in 0.18.0 on tied
    embeddings), so ``--int4-symmetric`` changes nothing; the int4 algorithm and fallback
    options are the ONNX int4 precision's."""

    int4_block_size: int = 32


def options_from_extra(extra: dict[str, object]) -> LlmPrecisionOptions:
    return LlmPrecisionOptions(int4_block_size=Int4Options.from_extra(extra).block_size)


def check_precision(precision: str, target: str = "cpu") -> None:
    """A one-line BuildError for a precision this host cannot build for an LLM."""
    if precision in CPU_PRECISIONS:
        return
    if precision in CUDA_PRECISIONS:
        raise BuildError(
            f"{precision} for decoder LLMs needs onnxruntime-genai's CUDA build and an NVIDIA "
            f"GPU (not available here); on CPU use {', '.join(CPU_PRECISIONS)}"
        )
    raise BuildError(
        f"precision {precision!r} is not built for decoder LLMs; use {', '.join(CPU_PRECISIONS)}"
    )


def recipe(precision: str, options: LlmPrecisionOptions) -> GenaiRecipe:
    check_precision(precision)
    if precision == "int4":
        return GenaiRecipe("int4", {"block_size": str(options.int4_block_size)})
    return GenaiRecipe(precision)
