"""INT4: 4-bit block-wise weight-only quantization (ONNX Runtime ``MatMulNBits`` and
``GatherBlockQuantized``) for transformer sources; activations stay FP32.

The MatMul weights and the embedding tables are quantized (``builder.precisions.int4_quant``).
With ``--accuracy-budget`` the layers whose 4-bit error is worst (``builder.drift``) stay at
8-bit (``--int4-fallback int8``, the default; embeddings stay FP32) or FP32 until the variant is
within budget (``builder.budget``); the manifest lists them under ``fp32_kept_nodes`` with
``kept_nodes_as`` saying which. Non-transformer sources are refused before any work unless
``--int4-any-model`` asks for them: int4 quantizes MatMul/Gather weights only, and a CNN's are
Conv/Gemm.
"""

from __future__ import annotations

import logging
from pathlib import Path

from builder.errors import QuantizationError
from builder.options import BuildOptions
from builder.precisions.base import BuildContext, VariantResult
from builder.precisions.budgeted import build_within_budget
from builder.precisions.int4_options import Int4Options
from builder.precisions.int8 import check_quantizable
from builder.sources.base import LoadedModel

log = logging.getLogger(__name__)

INT4_OPS = ("MatMul", "Gather")  # the nodes the budget may keep out of 4-bit
CALIBRATION_ROWS = 32  # gptq's calibration rows (its Hessians grow with them)


class Int4:
    name = "int4"

    def skip_reason(self, model: LoadedModel, options: BuildOptions) -> str | None:
        return None

    def refusal(self, model: LoadedModel, options: BuildOptions) -> str | None:
        """Why int4 is refused for ``model`` before any work (None: it is built)."""
        opts = Int4Options.from_extra(options.extra)  # bad options fail here too
        if model.transformer or opts.any_model:
            return None
        from builder.precisions.int4_quant import census

        weights = census(model.fp32_onnx)
        return (
            f"int4 quantizes transformer MatMul and embedding weights, and {model.name} is not "
            f"a transformer source: it has {weights.describe()} (conv/Gemm models: use int8); "
            "--int4-any-model builds it anyway"
        )

    def build(self, ctx: BuildContext, out_path: Path) -> VariantResult:
        from builder.precisions.int4_quant import census, quantize_int4, to_int4_opset

        opts = Int4Options.from_extra(ctx.options.extra)
        check_quantizable(ctx.fp32_path)
        weights = census(ctx.fp32_path)
        if not weights.quantizable_params:
            raise QuantizationError(
                f"int4: {ctx.model.name} has no MatMul or embedding Gather weights to quantize "
                f"({weights.describe()})"
            )
        float_path, embeddings, note = ctx.fp32_path, bool(weights.gathers), None
        if embeddings:
            try:
                float_path = to_int4_opset(ctx.fp32_path, ctx.work_dir / "int4_float.onnx")
            except Exception as e:
                embeddings, note = False, f"embeddings left FP32: opset 21 conversion failed: {e}"
                log.warning("int4: %s", note)
        calibration = None
        if opts.algorithm == "gptq":
            calibration = ctx.model.calibration.take(CALIBRATION_ROWS)

        def quantize(kept: list[str], path: Path) -> None:
            quantize_int4(float_path, path, weights, opts, kept, calibration, embeddings)

        # Not timed: int4 is about size, and MatMulNBits with FP32 activations is slower than
        # FP32 here (docs/builder.md), which would stop a speed-guided search at its start.
        outcome, diagnostics = build_within_budget(
            ctx,
            out_path,
            float_path,
            quantize,
            INT4_OPS,
            timed=False,
            nodes=set(weights.matmuls) | (set(weights.gathers) if embeddings else set()),
        )
        details: dict[str, object] = {
            "format": "MatMulNBits",
            "bits": 4,
            "algorithm": opts.algorithm,
            "block_size": opts.block_size,
            "symmetric": opts.symmetric,
            "activations": "fp32",
            "quantized_matmuls": len(weights.matmuls),
            "quantized_embeddings": len(weights.gathers) if embeddings else 0,
            "kept_nodes_as": "8-bit MatMulNBits (embeddings FP32)"
            if opts.fallback == "int8"
            else "FP32",
        }
        if calibration is not None:
            details["calibration_samples"] = len(calibration)
            details["calibration_data"] = calibration.description or "model source"
        if note:
            details["note"] = note
        return VariantResult(out_path, details={**details, **diagnostics, **outcome.details()})
