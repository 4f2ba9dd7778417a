"""Static INT8: ONNX Runtime QDQ quantization, per-channel weights, calibrated and cached.

- Activation/weight types follow the host: unsigned 8-bit activations with signed weights on x86
  (signed/signed is no faster than FP32 there), signed/signed elsewhere.
- Calibration ranges are cached under the model's cache dir, keyed by a hash of the
  pre-processed model, the calibration data and the method; a rebuild reuses them.
- Per-node error vs FP32 (``builder.drift``) lists the nodes that add the most error. With an
  accuracy budget, ``builder.budget`` keeps the worst ones FP32 and picks the fastest variant
  within the budget (or says it is not met).
"""

from __future__ import annotations

import logging
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder import hostinfo
from builder.calibration import DatasetReader, cache_key, ort_method
from builder.errors import QuantizationError
from builder.options import BuildOptions
from builder.precisions.base import BuildContext, VariantResult
from builder.precisions.budgeted import QuantizeFn, build_within_budget
from builder.prepare import preprocess  # noqa: F401  (re-exported: the GPU target, the lab)
from builder.sources.base import Dataset, LoadedModel

log = logging.getLogger(__name__)

# ONNX Runtime quantization formats; QDQ is the default (OpenVINO and TensorRT read it too).
# BuildOptions.extra["int8_format"] = "QOperator" asks for QLinear* operators instead.
FORMATS = ("QDQ", "QOperator")
TRANSFORMER_NEEDS_BUDGET = (
    "static INT8 on a transformer is built only with --accuracy-budget (which keeps the worst "
    "layers FP32): naive static INT8 collapses MiniLM (mean cosine 0.36 to FP32); "
    "int8-dynamic is the transformers' INT8"
)
STANDARD_DOMAINS = {"", "ai.onnx", "com.microsoft", "ai.onnx.ml"}


@dataclass
class QuantTypes:
    activation: str  # "QUInt8" | "QInt8"
    weight: str
    reduce_range: bool
    reason: str


def host_quant_types() -> QuantTypes:
    """The fastest correct INT8 types for this CPU (ONNX Runtime's CPU guidance + our numbers)."""
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        if hostinfo.supports_vnni():
            return QuantTypes(
                "QUInt8", "QInt8", False, "x86 with VNNI: U8 activations x S8 weights (fast path)"
            )
        return QuantTypes(
            "QUInt8", "QInt8", True, "x86 without VNNI: U8 x S8 with 7-bit weights (no saturation)"
        )
    return QuantTypes("QInt8", "QInt8", False, f"{machine}: symmetric S8 x S8")


def check_quantizable(model_path: Path) -> None:
    """Fail early, naming the node, on ops that ONNX Runtime cannot run or quantize."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for node in model.graph.node:
        if node.domain not in STANDARD_DOMAINS:
            raise QuantizationError(
                f"node {node.name or '<unnamed>'!r} uses op {node.domain}::{node.op_type}, "
                "which ONNX Runtime cannot quantize"
            )


def quantize_static_qdq(
    fp32_path: Path,
    out_path: Path,
    calibration: Dataset,
    method: str = "minmax",
    activation_type: str = "QUInt8",
    weight_type: str = "QInt8",
    per_channel: bool = True,
    reduce_range: bool = False,
    symmetric_activations: bool = False,
    symmetric_weights: bool = True,
    nodes_to_exclude: list[str] | None = None,
    op_types_to_quantize: list[str] | None = None,
    cache_path: Path | None = None,
    calibration_batch: int = 8,
    extra_options: dict[str, Any] | None = None,
    quant_format: str = "QDQ",
) -> None:
    """ONNX Runtime ``quantize_static``, QDQ format by default (shared by the CPU and GPU
    targets); ``quant_format="QOperator"`` writes QLinear* operators instead."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if quant_format not in FORMATS:
        raise QuantizationError(
            f"INT8 format must be one of {', '.join(FORMATS)}, got {quant_format!r}"
        )

    options = {
        "ActivationSymmetric": symmetric_activations,
        "WeightSymmetric": symmetric_weights,
        **(extra_options or {}),
    }
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        quantize_static(
            str(fp32_path),
            str(out_path),
            calibration_data_reader=DatasetReader(calibration, calibration_batch),
            quant_format=QuantFormat.from_string(quant_format),
            per_channel=per_channel,
            reduce_range=reduce_range,
            activation_type=QuantType[activation_type],
            weight_type=QuantType[weight_type],
            nodes_to_exclude=nodes_to_exclude or [],
            op_types_to_quantize=op_types_to_quantize,
            calibrate_method=ort_method(method),
            extra_options=options,
            calibration_cache_path=str(cache_path) if cache_path else None,
        )
    except QuantizationError:
        raise
    except Exception as e:
        raise QuantizationError(f"static INT8 quantization failed: {e}") from e


def calibration_cache(ctx: BuildContext, pre: Path, calibration: Dataset) -> Path:
    """Where ONNX Runtime's calibration ranges for ``pre`` on ``calibration`` are kept."""
    method = ctx.options.calibration_method
    return ctx.cache_dir / f"{method}-{cache_key(pre, calibration, method)}.json"


def static_quantizer(
    ctx: BuildContext,
    pre: Path,
    calibration: Dataset,
    types: QuantTypes,
    quant_format: str = "QDQ",
) -> QuantizeFn:
    """Static INT8 of ``pre`` (per channel, this host's types, calibration cached) for
    :func:`build_within_budget`, which names the nodes to keep in FP32. SmoothQuant's Muls stay
    FP32: quantizing their input would quantize the unsmoothed range (the MatMul after each
    still gets its QDQ input)."""
    from builder.smoothquant import smoothing_nodes

    smoothing = smoothing_nodes(pre)
    batch = 1 if ctx.model.max_batch_size == 0 else 8

    def quantize(exclude: list[str], path: Path) -> None:
        quantize_static_qdq(
            pre,
            path,
            calibration,
            method=ctx.options.calibration_method,
            activation_type=types.activation,
            weight_type=types.weight,
            per_channel=True,
            reduce_range=types.reduce_range,
            nodes_to_exclude=[*exclude, *smoothing],
            cache_path=calibration_cache(ctx, pre, calibration),
            calibration_batch=batch,
            quant_format=quant_format,
        )

    return quantize


class StaticInt8:
    name = "int8"

    def skip_reason(self, model: LoadedModel, options: BuildOptions) -> str | None:
        if model.transformer and options.accuracy_budget is None:
            return TRANSFORMER_NEEDS_BUDGET
        return None

    def build(self, ctx: BuildContext, out_path: Path) -> VariantResult:
        from builder.precisions.smoothing import choose_smoothing

        opts = ctx.options
        quant_format = str(opts.extra.get("int8_format", "QDQ"))
        check_quantizable(ctx.fp32_path)
        calib = ctx.model.calibration.take(opts.calibration_samples)
        if len(calib) == 0:
            raise QuantizationError("no calibration data: the model source provided none")
        types = host_quant_types()

        def quantizer_for(pre: Path) -> QuantizeFn:
            return static_quantizer(ctx, pre, calib, types, quant_format)

        choice = choose_smoothing(ctx, "int8", quantizer_for)
        pre = choice.pre
        cache_path = calibration_cache(ctx, pre, calib)
        cache_hit = cache_path.is_file() and not choice.tried
        outcome, diagnostics = build_within_budget(
            ctx, out_path, pre, quantizer_for(pre), diagnose=True, nodes=keepable(pre)
        )
        return VariantResult(
            out_path,
            details={
                "format": quant_format,
                "activation_type": types.activation,
                "weight_type": types.weight,
                "reduce_range": types.reduce_range,
                "per_channel": True,
                "type_choice": types.reason,
                "calibration_method": opts.calibration_method,
                "calibration_samples": len(calib),
                "calibration_data": calib.description or "model source",
                "calibration_cache": cache_path.name,
                "calibration_cache_hit": cache_hit,
                **choice.details(),
                **diagnostics,
                **outcome.details(),
            },
        )


def keepable(pre: Path) -> list[str] | None:
    """The nodes the budget search may keep FP32 in a statically quantized ``pre``: every one
    but SmoothQuant's Muls, which stay FP32 anyway (None: no Muls, any node)."""
    import onnx

    from builder.smoothquant import smoothing_nodes

    model = onnx.load(str(pre), load_external_data=False)
    skip = set(smoothing_nodes(model))
    return [n.name for n in model.graph.node if n.name not in skip] if skip else None
