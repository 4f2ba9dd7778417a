"""FP16 with onnxconverter-common, inputs/outputs kept FP32, risky ops kept FP32.

Nodes whose FP32 initializers do not fit in FP16 are blocked up front. If the converted model
still overflows (non-finite outputs) or drifts (min cosine to FP32 below the floor), the
numerically sensitive ops in ``ESCALATION_OPS`` are kept FP32 as well and it is converted again.
What was blocked is recorded in the variant's details.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np

from builder.errors import QuantizationError
from builder.options import BuildOptions
from builder.precisions.base import BuildContext, VariantResult
from builder.sources.base import LoadedModel

log = logging.getLogger(__name__)

FP16_MAX = 65504.0
COSINE_FLOOR = 0.995
MAX_NODE_RETRIES = 20
_BAD_NODE = re.compile(r"of node \(([^)]+)\)")
ESCALATION_OPS = [
    "Pow",
    "ReduceMean",
    "ReduceSum",
    "Sqrt",
    "Reciprocal",
    "Div",
    "Exp",
    "Softmax",
    "LayerNormalization",
    "Erf",
]


def overflowing_nodes(model) -> list[str]:
    """Nodes that consume an FP32 initializer with values outside FP16's range."""
    from onnx import TensorProto, numpy_helper

    big = set()
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(init)
            if arr.size and float(np.abs(arr).max()) > FP16_MAX:
                big.add(init.name)
    return [n.name for n in model.graph.node if n.name and big.intersection(n.input)]


class FP16:
    name = "fp16"

    def skip_reason(self, model: LoadedModel, options: BuildOptions) -> str | None:
        return None

    def _convert(self, src: Path, dst: Path, op_block: list[str], node_block: list[str]) -> None:
        import onnx
        from onnxconverter_common import float16

        model = onnx.load(str(src))
        try:
            with warnings.catch_warnings():  # "truncated to 1e-07" for every tiny weight
                warnings.simplefilter("ignore", UserWarning)
                converted = float16.convert_float_to_float16(
                    model,
                    keep_io_types=True,
                    op_block_list=op_block,
                    node_block_list=node_block,
                    disable_shape_infer=False,
                )
        except Exception as e:
            raise QuantizationError(f"fp16 conversion failed: {e}") from e
        onnx.save(converted, str(dst))

    def _loads(self, path: Path) -> str | None:
        """None if ONNX Runtime loads ``path``, else its complaint."""
        from common.engines import EngineError, get_engine

        try:
            get_engine("onnxruntime").load(path)
        except EngineError as e:
            return str(e)
        return None

    def _convert_loadable(
        self, src: Path, dst: Path, op_block: list[str], node_block: list[str]
    ) -> str | None:
        """Convert; while ONNX Runtime rejects a node's types (the converter leaves some Cast
        value-infos inconsistent), keep that node FP32 and convert again. Returns the last
        complaint if the model still does not load."""
        for _ in range(MAX_NODE_RETRIES):
            self._convert(src, dst, op_block, node_block)
            problem = self._loads(dst)
            if problem is None:
                return None
            match = _BAD_NODE.search(problem)
            if not match or match.group(1) in node_block:
                return problem
            node_block.append(match.group(1))
        return problem

    def build(self, ctx: BuildContext, out_path: Path) -> VariantResult:
        import onnx
        from onnxconverter_common import float16

        model = onnx.load(str(ctx.fp32_path))
        node_block = overflowing_nodes(model)
        op_block = list(float16.DEFAULT_OP_BLOCK_LIST)
        problem = self._convert_loadable(ctx.fp32_path, out_path, op_block, node_block)
        if problem is None:
            quality = ctx.evaluator.quality(out_path)
            if not quality.get("finite") or (quality.get("cosine_min") or 0.0) < COSINE_FLOOR:
                problem = f"drift (finite={quality.get('finite')}, min cosine "
                problem += f"{quality.get('cosine_min')})"
        escalated = problem is not None
        if escalated:
            log.info("fp16: %s; keeping %s in FP32", problem, ", ".join(ESCALATION_OPS))
            op_block = sorted(set(op_block) | set(ESCALATION_OPS))
            still = self._convert_loadable(ctx.fp32_path, out_path, op_block, node_block)
            if still is not None:
                raise QuantizationError(f"fp16 conversion produced an unloadable model: {still}")
        return VariantResult(
            out_path,
            details={
                "keep_io_types": True,
                "blocked_nodes": node_block,
                "blocked_ops_added": sorted(set(op_block) - set(float16.DEFAULT_OP_BLOCK_LIST)),
                "escalated": escalated,
                "escalation_reason": problem,
            },
        )
