"""4-bit weight-only quantization with ONNX Runtime's ``matmul_nbits_quantizer``.

Passes over one in-memory model, each an ONNX Runtime quantizer:

1. MatMul weights to 4-bit ``MatMulNBits`` with the chosen algorithm: ``rtn`` (ORT's block-wise
   round-to-nearest, ``DefaultWeightOnlyQuantConfig``), ``hqq`` (``HQQWeightOnlyQuantConfig``,
   no data) or ``gptq`` (``neural_compressor.gptq_quantize``, calibrated).
2. The MatMuls the accuracy budget keeps out of 4-bit: 8-bit ``MatMulNBits`` (fallback "int8"),
   or left FP32.
3. Embedding ``Gather`` tables to 4-bit ``GatherBlockQuantized`` (block-wise along the hidden
   axis); kept ones stay FP32. This needs opset 21 (int4 tensors): the float model is converted
   first (``onnx.version_converter``), and when that fails the embeddings stay FP32.

Activations stay FP32; inputs and outputs are the FP32 model's.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import QuantizationError
from builder.precisions.int4_options import Int4Options
from builder.sources.base import Dataset

log = logging.getLogger(__name__)

INT4_OPSET = 21  # int4/uint4 tensors (GatherBlockQuantized's data)
FLOAT = 1  # onnx.TensorProto.FLOAT


@dataclass
class WeightCensus:
    """Which nodes hold weights int4 can quantize, and how many parameters the model has where."""

    matmuls: list[str] = field(default_factory=list)  # MatMul nodes with a 2-D float weight
    gathers: list[str] = field(default_factory=list)  # Gather nodes over a 2-D float table
    quantizable_params: int = 0
    params_by_op: Counter[str] = field(default_factory=Counter)

    @property
    def total_params(self) -> int:
        return sum(self.params_by_op.values())

    def describe(self) -> str:
        top = ", ".join(f"{op} {_count(n)}" for op, n in self.params_by_op.most_common(3))
        share = self.quantizable_params / max(1, self.total_params)
        return (
            f"{len(self.matmuls)} MatMul and {len(self.gathers)} embedding Gather weights, "
            f"{share:.0%} of its {_count(self.total_params)} weights (by op: {top or 'none'})"
        )


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 100_000 else f"{n:,}"


def census(path: Path) -> WeightCensus:
    import numpy as np
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name: i for i in graph.initializer}
    out = WeightCensus()
    counted: set[str] = set()
    for node in graph.node:
        for name in node.input:
            init = inits.get(name)
            if init is not None and init.data_type == FLOAT and name not in counted:
                counted.add(name)
                out.params_by_op[node.op_type] += int(np.prod(init.dims))

        slot = {"MatMul": 1, "Gather": 0}.get(node.op_type)
        init = inits.get(node.input[slot]) if slot is not None and len(node.input) > slot else None
        if init is None or init.data_type != FLOAT or len(init.dims) != 2:
            continue
        (out.matmuls if node.op_type == "MatMul" else out.gathers).append(node.name)
        out.quantizable_params += int(np.prod(init.dims))
    if any(not n for n in out.matmuls + out.gathers):
        raise QuantizationError("int4 needs named nodes: the model has unnamed MatMul/Gather nodes")
    return out


def to_int4_opset(src: Path, dst: Path) -> Path:
    """``src`` at opset >= 21 (written to ``dst`` when converted)."""
    import onnx
    from onnx import version_converter

    model = onnx.load(str(src))
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset >= INT4_OPSET:
        return src
    converted = version_converter.convert_version(model, INT4_OPSET)
    converted.ir_version = max(converted.ir_version, 10)
    onnx.save(converted, str(dst))
    return dst


def nbits_module() -> Any:
    """``onnxruntime.quantization.matmul_nbits_quantizer``, imported without its side effect:
    it calls ``logging.basicConfig(level=INFO)`` on import (every node logged at INFO)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization import matmul_nbits_quantizer

    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def _model_proto(quantizer: Any) -> Any:
    model = quantizer.model
    return model.model if hasattr(model, "model") else model


def _others(names: Iterable[str], keep: Iterable[str], graph: Any) -> list[str]:
    """Every node name in ``graph`` except ``names`` minus ``keep``: what a pass must skip."""
    wanted = set(names) - set(keep)
    return [n.name for n in graph.node if n.name and n.name not in wanted]


def _nbits(model: Any, nodes: list[str], kept: list[str], config: Any, opts: Int4Options) -> Any:
    bits = getattr(config, "bits", 4)
    q = nbits_module().MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=opts.block_size,
        is_symmetric=opts.symmetric,
        nodes_to_exclude=_others(nodes, kept, model.graph),
        algo_config=config,
    )
    q.process()
    return _model_proto(q)


def _gptq(model: Any, nodes: list[str], kept: list[str], opts: Int4Options, data: Dataset) -> Any:
    from onnxruntime.quantization.neural_compressor import gptq_quantize

    scheme = "sym" if opts.symmetric else "asym"
    config = {
        n: {"bits": 4, "group_size": opts.block_size, "scheme": scheme, "algorithm": "GPTQ"}
        for n in nodes
        if n not in set(kept)
    }
    loader = [(feed, None) for feed in data.batches(8)]
    out = gptq_quantize(
        model,
        loader,
        weight_config=config,
        num_bits=4,
        group_size=opts.block_size,
        scheme=scheme,
        n_samples=-1,
    )
    return out.model if hasattr(out, "model") else out


def _matmul_config(opts: Int4Options) -> Any:
    nbits = nbits_module()
    if opts.algorithm == "hqq":
        return nbits.HQQWeightOnlyQuantConfig(
            block_size=opts.block_size, op_types_to_quantize=("MatMul",)
        )
    return nbits.DefaultWeightOnlyQuantConfig(
        block_size=opts.block_size, is_symmetric=opts.symmetric, op_types_to_quantize=("MatMul",)
    )


def quantize_int4(
    float_path: Path,
    out_path: Path,
    weights: WeightCensus,
    opts: Int4Options,
    kept: list[str],
    calibration: Dataset | None = None,
    embeddings: bool = True,
) -> None:
    """Write the int4 variant of ``float_path`` (see the module docstring); ``kept`` nodes
    stay out of 4-bit."""
    import onnx

    default_config = nbits_module().DefaultWeightOnlyQuantConfig
    model = onnx.load(str(float_path))
    try:
        if opts.algorithm == "gptq":
            if calibration is None or len(calibration) == 0:
                raise QuantizationError("int4 gptq needs calibration data; the source has none")
            model = _gptq(model, weights.matmuls, kept, opts, calibration)
        elif weights.matmuls:
            model = _nbits(model, weights.matmuls, kept, _matmul_config(opts), opts)
        fallback = [n for n in kept if n in set(weights.matmuls)]
        if fallback and opts.fallback == "int8":
            eight = default_config(
                block_size=opts.block_size,
                is_symmetric=opts.symmetric,
                op_types_to_quantize=("MatMul",),
                bits=8,
            )
            model = _nbits(model, fallback, [], eight, opts)
        if embeddings and weights.gathers:
            gather = default_config(
                block_size=opts.block_size,
                is_symmetric=opts.symmetric,
                op_types_to_quantize=("Gather",),
                quant_axes=(("Gather", 1),),
            )
            model = _nbits(model, weights.gathers, kept, gather, opts)
    except QuantizationError:
        raise
    except Exception as e:
        raise QuantizationError(f"int4 ({opts.algorithm}) quantization failed: {e}") from e
    onnx.save(model, str(out_path))
