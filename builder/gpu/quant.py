"""INT8 for TensorRT: explicit Q/DQ with symmetric signed INT8 activations and weights.

TensorRT 11 dropped the INT8 calibrator; INT8 engines come from Q/DQ nodes in the ONNX file
only, and TensorRT accepts only symmetric signed quantization (zero point 0, INT8). So a GPU
target gets its own INT8 file, different from the CPU one (which uses unsigned activations
because that is what is fast on x86): ONNX Runtime ``quantize_static`` with
``activation_type=QInt8, weight_type=QInt8, per_channel=True, QuantFormat.QDQ`` and
``ActivationSymmetric/WeightSymmetric=True``. Biases stay FP32 (``QuantizeBias=False``), because
TensorRT's ONNX parser rejects DequantizeLinear on INT32 biases. Q/DQ is meant for the weighted
ops (Conv, ConvTranspose, Gemm, MatMul), where TensorRT's explicit-quantization guidance puts
it; this restriction applies when the builder's shared ``quantize_static_qdq`` accepts
``op_types_to_quantize`` (otherwise ONNX Runtime's default op set is quantized, symmetric all the
same, and the details say so).

:func:`tensorrt_qdq_problems` checks any file against these rules before TensorRT sees it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import CalibrationDataError, QuantizationError
from builder.gpu.errors import GpuVariantError
from builder.sources.base import Dataset

TENSORRT_QUANT_OPS: tuple[str, ...] = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_UNSUPPORTED_OPS = {
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "QLinearAdd",
    "QLinearMul",
    "QGemm",
}


def tensorrt_quant_settings(
    per_channel: bool = True, op_types: Sequence[str] | None = TENSORRT_QUANT_OPS
) -> dict[str, Any]:
    """The quantization choices recorded in the variant details."""
    return {
        "format": "QDQ",
        "activation_type": "int8",
        "weight_type": "int8",
        "symmetric_activations": True,
        "symmetric_weights": True,
        "per_channel": per_channel,
        "quantize_bias": False,
        "op_types": list(op_types) if op_types is not None else "onnxruntime default",
        "target": "tensorrt",
    }


def _lead_quantizer() -> tuple[Any, bool]:
    """The builder's shared ``quantize_static_qdq``; does it take ``op_types_to_quantize``?"""
    from builder.precisions.int8 import quantize_static_qdq

    return quantize_static_qdq, "op_types_to_quantize" in inspect.signature(
        quantize_static_qdq
    ).parameters


def quantize_for_tensorrt(
    fp32_path: Path,
    out_path: Path,
    calibration: Dataset,
    method: str = "minmax",
    batch_size: int = 8,
    nodes_to_exclude: Sequence[str] = (),
    op_types: Sequence[str] | None = TENSORRT_QUANT_OPS,
    per_channel: bool = True,
    weights_as_qdq_pair: bool = False,
    cache_path: Path | None = None,
) -> dict[str, Any]:
    """Write the TensorRT INT8 Q/DQ file; return the details to record.

    Runs through the builder's shared ``builder.precisions.int8.quantize_static_qdq`` (same
    calibration reader and cache as the CPU INT8) with TensorRT's types. ``op_types=None``
    quantizes every op type ONNX Runtime knows. ``weights_as_qdq_pair`` keeps FP32 weights
    behind a Q->DQ pair instead of INT8 weights behind a DQ (larger file; for TensorRT builds
    that refuse INT8 weight initializers).
    """
    if len(calibration) == 0:
        raise CalibrationDataError("INT8 for TensorRT needs calibration data; the set is empty")
    quantize, takes_op_types = _lead_quantizer()
    kwargs: dict[str, Any] = {}
    used_op_types: list[str] | None = None
    if op_types is not None and takes_op_types:
        kwargs["op_types_to_quantize"] = list(op_types)
        used_op_types = list(op_types)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quantize(
        Path(fp32_path),
        out_path,
        calibration,
        method=method,
        activation_type="QInt8",
        weight_type="QInt8",
        per_channel=per_channel,
        reduce_range=False,
        symmetric_activations=True,
        symmetric_weights=True,
        nodes_to_exclude=list(nodes_to_exclude),
        cache_path=cache_path,
        calibration_batch=batch_size,
        extra_options={"QuantizeBias": False, "AddQDQPairToWeight": bool(weights_as_qdq_pair)},
        **kwargs,
    )
    problems = tensorrt_qdq_problems(out_path)
    if problems:
        raise QuantizationError(f"INT8 file for TensorRT is not usable: {problems[0]}")
    details = tensorrt_quant_settings(per_channel, used_op_types)
    details.update(
        calibration_method=method,
        calibration_samples=len(calibration),
        nodes_excluded=list(nodes_to_exclude),
        weights_as_qdq_pair=bool(weights_as_qdq_pair),
    )
    return details


def tensorrt_qdq_problems(path: Path) -> list[str]:
    """What keeps TensorRT from building INT8 from this Q/DQ file (empty list: nothing)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    problems: list[str] = []
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    for node in graph.node:
        if node.op_type in _UNSUPPORTED_OPS:
            problems.append(
                f"node {node.name or node.output[0]!r} is {node.op_type}: TensorRT takes only "
                "QuantizeLinear/DequantizeLinear (static QDQ), not dynamic or QOperator INT8"
            )
    if not qdq:
        problems.append(f"{path} has no QuantizeLinear/DequantizeLinear nodes")
    for node in qdq:
        label = node.name or node.output[0]
        if len(node.input) < 3 or not node.input[2]:
            problems.append(f"{node.op_type} {label!r} has no zero point (defaults to uint8)")
            continue
        zp = inits.get(node.input[2])
        if zp is None:
            problems.append(f"{node.op_type} {label!r}: zero point is not a constant")
            continue
        if zp.data_type != TensorProto.INT8:
            dtype = TensorProto.DataType.Name(zp.data_type)
            problems.append(f"{node.op_type} {label!r}: zero point is {dtype}, TensorRT needs INT8")
        elif np.any(numpy_helper.to_array(zp) != 0):
            problems.append(
                f"{node.op_type} {label!r}: zero point is not 0 (asymmetric); TensorRT needs "
                "symmetric quantization"
            )
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            w = inits[node.input[0]]
            if w.data_type != TensorProto.INT8:
                dtype = TensorProto.DataType.Name(w.data_type)
                problems.append(
                    f"DequantizeLinear {label!r} reads a {dtype} constant; TensorRT accepts "
                    "INT8 constants only (quantize biases off: QuantizeBias=False)"
                )
    return problems


def weight_quantization(path: Path) -> dict[str, dict[str, Any]]:
    """For each quantized weight: dtype, shape, per-channel axis or None (per-tensor)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[str, dict[str, Any]] = {}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        src = inits.get(node.input[0])
        if src is None or len(src.dims) < 2:
            continue  # activations (and 1-D constants) are not weights
        if node.op_type == "QuantizeLinear" and src.data_type != TensorProto.FLOAT:
            continue
        scale = inits.get(node.input[1])
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        per_channel = scale is not None and len(scale.dims) == 1 and scale.dims[0] > 1
        zp = inits.get(node.input[2]) if len(node.input) > 2 else None
        out[node.input[0]] = {
            "stored_dtype": TensorProto.DataType.Name(src.data_type),
            "quant_dtype": TensorProto.DataType.Name(zp.data_type) if zp is not None else None,
            "shape": list(src.dims),
            "axis": axis if per_channel else None,
            "channels": int(scale.dims[0]) if per_channel else 1,
        }
    return out


def require_tensorrt_qdq(path: Path) -> None:
    problems = tensorrt_qdq_problems(path)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise GpuVariantError(
            f"{path} cannot be built into a TensorRT INT8 engine: {problems[0]}{more}"
        )
