"""``precision-build``: turn arguments into BuildOptions and call the build engine."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from builder.calibration import METHODS
from builder.errors import USER_ERRORS
from builder.precisions import int4_options, qat_options, smoothing_options


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="precision-build",
        description="Build FP32/FP16/BF16/INT8/INT4 variants of a model as a Triton model "
        "repository.",
    )
    p.add_argument(
        "model",
        help="digits | minilm | resnet50 | smollm2 | onnx:PATH | torch:MODULE:FACTORY | "
        "hf:FOLDER (an encoder, or a causal LM: docs/llm.md)",
    )
    p.add_argument(
        "--precisions",
        help="comma-separated, e.g. fp32,fp16,int8 (default: the model's own list)",
    )
    p.add_argument("--calibration-method", choices=METHODS, default="minmax")
    p.add_argument("--calibration-data", type=Path, help="folder of .npy/.npz files or images")
    p.add_argument("--calibration-samples", type=int, default=256)
    p.add_argument(
        "--eval-data",
        type=Path,
        help="folder (or file) of .npz/.npy rows, optional 'labels': every quality figure, the "
        "--accuracy-budget search and the engine choice are measured on it; for an LLM a UTF-8 "
        "text file (perplexity, KL and top-1 agreement are measured on it)",
    )
    p.add_argument(
        "--max-shape",
        action="append",
        default=[],
        metavar="NAME=D1xD2",
        help="largest shape of an input's dims (batch excluded), e.g. input_ids=512: the "
        "gateway refuses larger inputs and sizes its gRPC message limit from it (repeatable)",
    )
    p.add_argument(
        "--accuracy-budget",
        type=float,
        help="max loss vs FP32 in points for every quantized precision: the fastest variant "
        "within it, keeping the worst layers FP32; a variant that misses it is not written "
        "(LLMs: max perplexity increase over fp32 in percent)",
    )
    p.add_argument(
        "--kl-budget",
        type=float,
        help="LLMs: max mean KL divergence (nats) of next-token distributions vs fp32; a "
        "variant over it is not written",
    )
    p.add_argument(
        "--keep-over-budget",
        action="store_true",
        help="write a variant that misses --accuracy-budget anyway, labelled as such",
    )
    p.add_argument(
        "--int8-format",
        choices=("QDQ", "QOperator"),
        default="QDQ",
        help="static INT8 graph format (QDQ is faster on CPU here and what TensorRT takes)",
    )
    int4_options.add_arguments(p)
    qat_options.add_arguments(p)
    smoothing_options.add_arguments(p)
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--force", action="store_true", help="rebuild variants that already exist")
    p.add_argument("--engine", help="run every variant on this engine (default: measured)")
    p.add_argument("--target", choices=("cpu", "gpu"), default="cpu")
    p.add_argument(
        "--configs-only",
        action="store_true",
        help="with --target gpu: write GPU configs and ONNX inputs without building engines",
    )
    p.add_argument("--instances", type=int, default=1, help="Triton instance_group count")
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        help="dynamic_batching max_queue_delay_microseconds (0: batch only what already queued)",
    )
    p.add_argument("--threads", type=int, default=0, help="engine threads for checks (0: auto)")
    p.add_argument("--no-speed", action="store_true", help="skip the speed measurement")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace):
    from builder.max_shapes import parse_max_shapes
    from builder.options import BuildOptions

    precisions = (
        [s.strip() for s in args.precisions.split(",") if s.strip()] if args.precisions else None
    )
    return BuildOptions(
        repository=args.repository,
        precisions=precisions,
        calibration_method=args.calibration_method,
        calibration_data=args.calibration_data,
        calibration_samples=args.calibration_samples,
        eval_data=args.eval_data,
        accuracy_budget=args.accuracy_budget,
        kl_budget=args.kl_budget,
        keep_over_budget=args.keep_over_budget,
        force=args.force,
        measure_speed=not args.no_speed,
        threads=args.threads,
        instance_count=args.instances,
        max_queue_delay_us=args.max_queue_delay_us,
        engine=args.engine,
        target=args.target,
        configs_only=args.configs_only,
        progress=not args.quiet,
        max_shapes=parse_max_shapes(args.max_shape),
        extra={
            "int8_format": args.int8_format,
            **int4_options.extra_from_args(args),
            **qat_options.extra_from_args(args),
            **smoothing_options.extra_from_args(args),
        },
    )


# What every build imports; they come with the `build` extra, not with the core (gateway) install.
BUILD_MODULES = ("onnx", "onnxconverter_common", "tqdm")


def missing_build_modules() -> list[str]:
    return [m for m in BUILD_MODULES if importlib.util.find_spec(m) is None]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    missing = missing_build_modules()
    if missing:
        print(
            f"precision-build: error: the builder needs {', '.join(missing)}, which this install "
            "lacks (the core install is the gateway only): pip install 'precision-serve[build]'",
            file=sys.stderr,
        )
        return 2
    try:
        from builder.pipeline import build_model
        from builder.report import summary

        manifest = build_model(args.model, options_from_args(args))
    except USER_ERRORS as e:
        print(f"precision-build: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("precision-build: interrupted; nothing half-written was left", file=sys.stderr)
        return 130
    print(summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
