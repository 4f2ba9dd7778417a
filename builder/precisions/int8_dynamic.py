"""Dynamic INT8 (weights quantized, activations quantized at run time): the default INT8 for
transformers, where naive static INT8 collapses accuracy (MiniLM: cosine 0.36 to FP32).
With ``--accuracy-budget`` the MatMuls whose quantization adds the most error stay FP32
(``builder.budget``)."""

from __future__ import annotations

from pathlib import Path

from builder.errors import QuantizationError
from builder.options import BuildOptions
from builder.precisions.base import BuildContext, VariantResult
from builder.precisions.budgeted import QuantizeFn, build_within_budget
from builder.precisions.int8 import check_quantizable
from builder.sources.base import LoadedModel

# The ops quantize_dynamic quantizes by default: the only ones worth keeping in FP32.
DYNAMIC_OPS = ("MatMul", "Gemm", "Gather", "Attention", "LSTM", "EmbedLayerNormalization")


class DynamicInt8:
    name = "int8-dynamic"

    def skip_reason(self, model: LoadedModel, options: BuildOptions) -> str | None:
        return None

    def build(self, ctx: BuildContext, out_path: Path) -> VariantResult:
        from builder.precisions.smoothing import choose_smoothing

        check_quantizable(ctx.fp32_path)

        def quantizer_for(pre: Path) -> QuantizeFn:
            return lambda exclude, path: quantize_dynamic_int8(pre, path, exclude)

        choice = choose_smoothing(ctx, "int8_dynamic", quantizer_for)
        outcome, diagnostics = build_within_budget(
            ctx, out_path, choice.pre, quantizer_for(choice.pre), DYNAMIC_OPS
        )
        return VariantResult(
            out_path,
            details={
                "format": "dynamic",
                "weight_type": "QInt8",
                "per_channel": True,
                "activations": "runtime U8",
                **choice.details(),
                **diagnostics,
                **outcome.details(),
            },
        )


def quantize_dynamic_int8(pre: Path, path: Path, exclude: list[str] | None = None) -> None:
    """ONNX Runtime ``quantize_dynamic``: S8 per-channel weights, U8 activations at run time."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(
            str(pre),
            str(path),
            weight_type=QuantType.QInt8,
            # Per-channel weights: on MiniLM here, mean cosine to FP32 0.992 vs 0.961
            # per-tensor (200 held-out sentences; see docs/builder.md).
            per_channel=True,
            reduce_range=False,
            nodes_to_exclude=exclude or [],
            # ORT-fused transformer graphs need this (measurements.md).
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    except Exception as e:
        raise QuantizationError(f"dynamic INT8 quantization failed: {e}") from e
