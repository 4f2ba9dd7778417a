"""The int4 precision's options: a dataclass read from ``BuildOptions.extra`` and the
``precision-build`` flags that fill it (light: no onnx or onnxruntime import)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from builder.errors import BuildError
from builder.precisions.extra_options import from_extra

ALGORITHMS = ("rtn", "hqq", "gptq")
BLOCK_SIZES = (32, 64, 128)
# What a layer the accuracy budget keeps out of 4-bit becomes: 8-bit MatMulNBits (the embedding
# Gather has no 8-bit form in ONNX Runtime and stays FP32), or FP32 for everything.
FALLBACKS = ("int8", "fp32")
EXTRA_KEY = "int4"


@dataclass
class Int4Options:
    block_size: int = 32  # MiniLM: mean cosine 0.971 at 32, 0.952 at 128 (docs/builder.md)
    algorithm: str = "rtn"
    symmetric: bool = False
    any_model: bool = False  # build for non-transformer sources too
    fallback: str = "int8"

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise BuildError(
                f"int4 block_size must be one of {', '.join(map(str, BLOCK_SIZES))}, "
                f"got {self.block_size!r}"
            )
        if self.algorithm not in ALGORITHMS:
            raise BuildError(
                f"int4 algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}"
            )
        if self.fallback not in FALLBACKS:
            raise BuildError(
                f"int4 fallback must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}"
            )

    @classmethod
    def from_extra(cls, extra: Mapping[str, object]) -> Int4Options:
        return from_extra(cls, extra, EXTRA_KEY, "int4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("int4 (4-bit weight-only, ONNX Runtime MatMulNBits)")
    g.add_argument("--int4-block-size", type=int, choices=BLOCK_SIZES, default=32)
    g.add_argument(
        "--int4-algorithm",
        choices=ALGORITHMS,
        default="rtn",
        help="rtn: block-wise round-to-nearest; hqq: half-quadratic (no data); "
        "gptq: calibrated on the calibration data (MatMuls only; embeddings stay rtn)",
    )
    g.add_argument(
        "--int4-symmetric", action="store_true", help="symmetric blocks (no zero points)"
    )
    g.add_argument(
        "--int4-fallback",
        choices=FALLBACKS,
        default="int8",
        help="what the layers --accuracy-budget keeps out of 4-bit become",
    )
    g.add_argument(
        "--int4-any-model",
        action="store_true",
        help="build int4 for a non-transformer source too (only its MatMul/Gather weights)",
    )


def extra_from_args(args: argparse.Namespace) -> dict[str, object]:
    return {
        EXTRA_KEY: {
            "block_size": args.int4_block_size,
            "algorithm": args.int4_algorithm,
            "symmetric": args.int4_symmetric,
            "any_model": args.int4_any_model,
            "fallback": args.int4_fallback,
        }
    }
