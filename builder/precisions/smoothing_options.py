"""SmoothQuant's options for the INT8 precisions: a dataclass read from ``BuildOptions.extra``
and the ``precision-build`` flag that fills it (light: no onnx import)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass

from builder.errors import BuildError
from builder.precisions.extra_options import from_extra

EXTRA_KEY = "smoothquant"
DEFAULT_ALPHAS = (0.5, 0.8)


@dataclass
class SmoothOptions:
    """alphas: the SmoothQuant migration strengths tried next to no rescaling by ``int8``,
    ``int8-dynamic`` (with ``--accuracy-budget``) and ``int8-qat`` (its starting point); empty:
    never rescale."""

    alphas: tuple[float, ...] = DEFAULT_ALPHAS

    def __post_init__(self) -> None:
        self.alphas = tuple(float(a) for a in self.alphas)
        bad = [a for a in self.alphas if not 0.0 < a < 1.0]
        if bad:
            raise BuildError(f"SmoothQuant alphas must be in (0, 1), got {bad}")

    @classmethod
    def from_extra(cls, extra: Mapping[str, object]) -> SmoothOptions:
        return from_extra(cls, extra, EXTRA_KEY, "smoothquant")


def parse_alphas(text: str) -> tuple[float, ...]:
    if text.strip().lower() in ("none", "off", ""):
        return ()
    try:
        return tuple(float(a) for a in text.split(",") if a.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers in (0, 1) or 'none', got {text!r}"
        ) from e


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--smoothquant-alphas",
        type=parse_alphas,
        default=",".join(f"{a:g}" for a in DEFAULT_ALPHAS),
        metavar="A,B",
        help="SmoothQuant alphas that int8 / int8-dynamic (with --accuracy-budget) and int8-qat "
        "try next to no rescaling; 'none': never rescale (default: 0.5,0.8)",
    )


def extra_from_args(args: argparse.Namespace) -> dict[str, object]:
    return {EXTRA_KEY: {"alphas": tuple(args.smoothquant_alphas)}}
