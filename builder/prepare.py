"""Prepare the FP32 reference: ONNX Runtime's hardware-independent (basic) graph optimisations.

Constant folding turns computed weights (e.g. ``ConstantOfShape`` in old model-zoo exports) into
initializers, which FP16 conversion and per-channel INT8 need. The result is still standard ONNX.
"""

from __future__ import annotations

import logging
from pathlib import Path

from builder.errors import QuantizationError

log = logging.getLogger(__name__)


def initializers_as_constants(src: Path, dst: Path) -> Path:
    """Old exports (IR < 4) list every initializer as a graph input too, which makes weights
    overridable and stops constant folding; drop those inputs. Returns the path to use."""
    import onnx

    model = onnx.load(str(src))
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    if len(keep) == len(model.graph.input):
        return src
    del model.graph.input[:]
    model.graph.input.extend(keep)
    model.ir_version = max(model.ir_version, 4)
    onnx.save(model, str(dst))
    return dst


def optimize_basic(src: Path, dst: Path) -> Path:
    """Write the basic-optimised model to ``dst``; return ``src`` if optimisation fails."""
    import onnxruntime as ort

    src = initializers_as_constants(src, dst.with_name(f"{dst.stem}.inputs-fixed.onnx"))

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(dst)
    so.log_severity_level = 3
    try:
        ort.InferenceSession(str(src), sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # the original still works as the reference
        log.warning("basic graph optimisation failed, using the model as exported: %s", e)
        return src
    return dst if dst.is_file() else src


def preprocess(fp32_path: Path, out_path: Path) -> Path:
    """Shape inference + optimisation before quantization (symbolic shapes skipped: they fail
    on transformer exports)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=True)
    except Exception as e:
        raise QuantizationError(f"quantization pre-processing failed: {e}") from e
    return out_path
