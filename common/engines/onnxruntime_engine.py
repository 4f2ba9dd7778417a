"""ONNX Runtime engine (CPU by default; CUDA / TensorRT providers where installed)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.engines.base import EngineError, IOSpec, importable
from common.model_repository.dtypes import to_datatype
from common.model_repository.errors import DtypeError

# ONNX Runtime's type strings are ``tensor(<onnx element type>)``; where that name is not numpy's.
_ORT_NAMES = {"float": "float32", "double": "float64", "string": "object"}


def ort_dtype(ort_type: str) -> np.dtype:
    """``tensor(float)`` -> float32, ``tensor(string)`` -> object; :class:`DtypeError` for a type
    the gateway cannot serve (``tensor(complex64)``, ``tensor(bfloat16)``, sequences, maps)."""
    if not (ort_type.startswith("tensor(") and ort_type.endswith(")")):
        raise DtypeError(f"{ort_type} is not a tensor type")
    name = ort_type[len("tensor(") : -1]
    try:
        dtype = np.dtype(_ORT_NAMES.get(name, name))
    except TypeError:
        raise DtypeError(f"{ort_type} has no numpy equivalent") from None
    to_datatype(dtype)  # raises DtypeError where KServe v2 / Triton has no such type
    return dtype


def _spec(arg: Any, kind: str) -> IOSpec:
    try:
        dtype = ort_dtype(arg.type)
    except DtypeError as e:
        raise EngineError(f"onnxruntime: {kind} {arg.name!r} has type {arg.type}: {e}") from None
    shape = tuple(d if isinstance(d, int) else -1 for d in arg.shape)
    return IOSpec(arg.name, dtype, shape)


class OnnxRuntimeSession:
    def __init__(self, session: Any) -> None:
        self._session = session
        self.inputs = [_spec(a, "input") for a in session.get_inputs()]
        self.outputs = [_spec(a, "output") for a in session.get_outputs()]
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
