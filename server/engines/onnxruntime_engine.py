"""ONNX Runtime engine (CPU by default; CUDA / TensorRT providers where installed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from server.engines.base import EngineError, IOSpec, importable

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
    "tensor(string)": np.object_,
}


def _spec(arg: Any) -> IOSpec:
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    return IOSpec(arg.name, np.dtype(_ORT_TYPES.get(arg.type, np.float32)), shape)


class OnnxRuntimeSession:
    def __init__(self, session: Any) -> None:
        self._session = session
        self.inputs = [_spec(a) for a in session.get_inputs()]
        self.outputs = [_spec(a) for a in session.get_outputs()]
        self._output_names = [o.name for o in self.outputs]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            results = self._session.run(self._output_names, dict(feeds))
        except Exception as e:  # onnxruntime raises its own exception types
            raise EngineError(f"onnxruntime failed: {e}") from e
        return dict(zip(self._output_names, results, strict=True))


class OnnxRuntimeEngine:
    """Options: ``providers`` (list), ``graph_optimization_level`` ("all", "extended", ...),
    ``allow_spinning`` (default false: intra-op threads sleep between requests instead of
    spinning, which on a few shared cores took CPU the gRPC path needed)."""

    name = "onnxruntime"

    def available(self) -> bool:
        return importable("onnxruntime")

    def load(
        self, path: Path, options: Mapping[str, Any] | None = None, threads: int = 0
    ) -> OnnxRuntimeSession:
        import onnxruntime as ort

        options = dict(options or {})
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        spin = "1" if options.get("allow_spinning", False) else "0"
        so.add_session_config_entry("session.intra_op.allow_spinning", spin)
        level = options.get("graph_optimization_level", "all")
        so.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[level]
        providers = options.get("providers") or ["CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
        except Exception as e:
            raise EngineError(f"onnxruntime cannot load {path}: {e}") from e
        return OnnxRuntimeSession(session)
