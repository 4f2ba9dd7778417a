"""INT8 by quantization-aware training (``int8-qat``): for sources the builder can train
(``torch:``, ``hf:`` and the demos), when post-training INT8 loses too much.

For each deployed quantizer - static QDQ (``int8``'s types and calibration) or dynamic INT8
(``int8-dynamic``'s) - in the order of their measured speed on this host (``--qat-mode``
picks one): the post-training variant is measured first; a mode whose post-training loss is
beyond what bounded training recovers (``QatOptions.max_start_loss``) is not trained. Otherwise
``builder.qat`` fine-tunes the source's module with that quantizer emulated, and the trained
FP32 export goes through the same quantizer and the same ``--accuracy-budget`` search as the
post-training precisions. The first mode that meets the budget is the variant; the manifest
records every mode tried (``qat_tried``) and the training (``qat``: steps, data, time, loss).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from builder.errors import QuantizationError
from builder.options import BuildOptions
from builder.precisions.base import BuildContext, VariantResult
from builder.precisions.budgeted import build_within_budget
from builder.precisions.int8 import (
    check_quantizable,
    host_quant_types,
    preprocess,
    static_quantizer,
)
from builder.precisions.int8_dynamic import DYNAMIC_OPS, quantize_dynamic_int8
from builder.precisions.qat_options import QatOptions
from builder.sources.base import LoadedModel

log = logging.getLogger(__name__)

NOT_TRAINABLE = (
    "int8-qat needs a source the builder can train (torch:, hf:, digits, minilm); "
    "this source has no PyTorch module"
)


class QatInt8:
    name = "int8-qat"

    def skip_reason(self, model: LoadedModel, options: BuildOptions) -> str | None:
        qat = QatOptions.from_extra(options.extra)
        if qat.when == "never":
            return "--qat never"
        if model.trainable is None:
            return NOT_TRAINABLE
        return None

    def build(self, ctx: BuildContext, out_path: Path) -> VariantResult:
        from builder import qat as training
        from builder.prepare import optimize_basic

        opts = ctx.options
        qopts = QatOptions.from_extra(opts.extra)
        check_quantizable(ctx.fp32_path)
        data = ctx.model.calibration.take(opts.calibration_samples)
        if len(data) == 0:
            raise QuantizationError(
                "no training data: the model source provided no calibration rows"
            )
        calibration = data  # static calibration: the calibration rows only
        if ctx.model.training is not None:  # more rows for training, disjoint from evaluation
            data = data.concat(ctx.model.training)
        types = host_quant_types()
        lr = qopts.lr or training.DEFAULT_LR[ctx.model.transformer]
        settings = training.TrainingSettings(qopts.steps, qopts.batch_size, lr, qopts.max_seconds)

        def quantizer_fn(mode: str, pre: Path) -> Any:
            if mode == "dynamic":
                return lambda exclude, path: quantize_dynamic_int8(pre, path, exclude)

            return static_quantizer(ctx, pre, calibration, types)

        # Post-training first: each mode's loss (and speed, where measured) before any training,
        # with the SmoothQuant alpha chosen for it (training starts from that rescaling).
        modes = list(training.QAT_MODES) if qopts.mode == "auto" else [qopts.mode]
        choices = {m: _post_training(ctx, m, quantizer_fn) for m in modes}
        before = {
            m: {
                "accuracy_loss": round(c.chosen.loss or 0.0, 4),
                "speedup_vs_fp32": c.chosen.speedup and round(c.chosen.speedup, 3),
                "smoothquant_alpha": c.alpha,
            }
            for m, c in choices.items()
        }
        if qopts.mode == "auto":
            if all(b["speedup_vs_fp32"] is not None for b in before.values()):
                modes.sort(key=lambda m: -before[m]["speedup_vs_fp32"])
            elif ctx.model.transformer:  # unmeasured: static collapses transformers (int8.py)
                modes = ["dynamic", "static"]

        tried: list[dict[str, Any]] = []
        results: list[tuple[Any, dict[str, Any], Path, dict[str, Any]]] = []
        started = time.monotonic()
        for mode in modes:
            entry: dict[str, Any] = {"mode": mode, "post_training": before[mode]}
            tried.append(entry)
            if before[mode]["accuracy_loss"] > qopts.max_start_loss:
                entry["trained"] = False
                entry["why"] = (
                    f"post-training loss {before[mode]['accuracy_loss']:.3g} > "
                    f"{qopts.max_start_loss:g}: beyond what {qopts.steps} steps recover"
                )
                continue
            quantizer = training.Quantizer(mode, types.activation, types.reduce_range)
            smoothing = choices[mode].chosen.smoothing
            scales = _linear_scales(ctx.fp32_path, ctx.model.trainable.module, smoothing)
            onnx_path, record = training.trained_onnx(
                ctx.model, data, quantizer, settings, opts.progress, scales
            )
            trained = optimize_basic(onnx_path, ctx.work_dir / f"qat-{mode}-optimized.onnx")
            if smoothing is not None:  # the training's rescaling, on the exported graph
                trained = _rescaled(ctx, trained, smoothing, mode)
            pre = preprocess(trained, ctx.work_dir / f"qat-{mode}-pre.onnx")
            mode_out = ctx.work_dir / f"qat-{mode}.onnx"
            outcome, diagnostics = build_within_budget(
                ctx,
                mode_out,
                pre,
                quantizer_fn(mode, pre),
                DYNAMIC_OPS if mode == "dynamic" else None,
            )
            entry.update(
                trained=True,
                training=asdict(record),
                accuracy_loss=round(outcome.attempts[0].loss, 4),
                budget_status=outcome.status,
            )
            results.append((outcome, diagnostics, mode_out, asdict(record)))
            if outcome.met:
                break
        if not results:
            raise QuantizationError(
                "int8-qat: no mode trained: " + "; ".join(f"{t['mode']}: {t['why']}" for t in tried)
            )
        met = [r for r in results if r[0].met]
        outcome, diagnostics, chosen, record = (
            met[0] if met else min(results, key=lambda r: r[0].chosen.loss)
        )
        shutil.copyfile(chosen, out_path)
        mode = record["mode"]
        details: dict[str, Any] = {
            "format": "QDQ" if mode == "static" else "dynamic",
            "weight_type": "QInt8",
            "per_channel": True,
            "qat": {**record, "accuracy_loss_before": before[mode]["accuracy_loss"]},
            "qat_tried": tried,
            **choices[mode].details(),
            "qat_seconds": round(time.monotonic() - started, 1),
            **diagnostics,
            **outcome.details(),
        }
        if mode == "static":
            details.update(activation_type=types.activation, reduce_range=types.reduce_range)
        else:
            details["activations"] = "runtime U8"
        return VariantResult(out_path, details=details)


def _post_training(ctx: BuildContext, mode: str, quantizer_fn: Any) -> Any:
    """The mode's post-training variant, fully quantized, with the SmoothQuant alpha chosen for
    it (``builder.precisions.smoothing``): its loss and speed, and the float file."""
    from builder.precisions.smoothing import choose_smoothing

    choice = choose_smoothing(ctx, f"qat_{mode}", lambda pre: quantizer_fn(mode, pre), True)
    chosen = choice.chosen
    if chosen.loss is None:  # no alphas tried (--smoothquant-alphas none): measured here
        path = ctx.work_dir / f"ptq-{mode}.onnx"
        quantizer_fn(mode, chosen.pre)([], path)
        chosen.loss = float(ctx.evaluator.quality(path)["accuracy_loss"] or 0.0)
        if ctx.speedup and ctx.options.measure_speed:
            chosen.speedup = ctx.speedup(path)
    return choice


def _linear_scales(fp32: Path, module: Any, smoothing: Any) -> Any:
    """The chosen SmoothQuant scales for the source module's Linears (None: no rescaling)."""
    if smoothing is None:
        return None
    from builder import qat as training
    from builder.smoothquant import weight_scales

    scales = training.linear_scales(module, weight_scales(fp32, smoothing.scales))
    return training.LinearScales(smoothing.alpha, smoothing.key(), scales)


def _rescaled(ctx: BuildContext, trained: Path, smoothing: Any, mode: str) -> Path:
    """The trained export rescaled with the scales it was trained with (found by the activation
    tensor names, which an export of the same module repeats)."""
    from builder.smoothquant import smooth

    out = ctx.work_dir / f"qat-{mode}-smoothed.onnx"
    batch = 1 if ctx.model.max_batch_size == 0 else 8
    data = ctx.model.calibration.take(ctx.options.calibration_samples)
    record = smooth(trained, out, smoothing.alpha, data, batch, scales=smoothing.scales)
    if record.groups != smoothing.groups:
        raise QuantizationError(
            f"int8-qat: the trained export has {record.groups} of the "
            f"{smoothing.groups} rescaled inputs the training used"
        )
    return out
