"""Run a TensorRT plan from Python (GPU hosts only): used by the ``gpu``-marked tests.

TensorRT 10/11 I/O-tensor API (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``) with device memory from ``cuda-python`` (``cuda.bindings.runtime``, or
``cuda.cudart`` in older cuda-python). Imports happen on first use.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from builder.gpu.errors import INSTALL_HINT, GpuUnavailableError


def _cudart() -> Any:
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as e:
            raise GpuUnavailableError(
                f"cuda-python is not installed ({e}); run: {INSTALL_HINT}"
            ) from e
    return cudart


def _check(result: Any) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"CUDA error {err}")
    return rest[0] if len(rest) == 1 else rest


def _handle(obj: Any) -> int:
    """A cuda-python handle (stream) as the integer TensorRT takes."""
    try:
        return int(obj)
    except TypeError:
        return int(obj.getPtr())


class TensorRTRunner:
    """Deserialize a plan once; ``run`` copies inputs to the GPU, executes, copies outputs back."""

    def __init__(self, plan: Path) -> None:
        from builder.gpu.tensorrt_build import import_tensorrt

        self._trt = trt = import_tensorrt()
        self._cudart = _cudart()
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(plan).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialize {plan} (other GPU or version?)")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart = self._trt, self._cudart
        stream = _check(cudart.cudaStreamCreate())
        allocations = []
        try:
            for name in self.inputs:
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                host = np.ascontiguousarray(feeds[name], dtype=dtype)
                self.context.set_input_shape(name, host.shape)
                ptr = _check(cudart.cudaMalloc(max(host.nbytes, 1)))
                allocations.append(ptr)
                _check(
                    cudart.cudaMemcpy(
                        ptr,
                        host.ctypes.data,
                        host.nbytes,
                        cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                    )
                )
                self.context.set_tensor_address(name, int(ptr))
            results: dict[str, np.ndarray] = {}
            for name in self.outputs:
                dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
                shape = tuple(self.context.get_tensor_shape(name))
                results[name] = np.empty(shape, dtype=dtype)
                ptr = _check(cudart.cudaMalloc(max(results[name].nbytes, 1)))
                allocations.append(ptr)
                self.context.set_tensor_address(name, int(ptr))
            if not self.context.execute_async_v3(_handle(stream)):
                raise RuntimeError("TensorRT execute_async_v3 failed")
            _check(cudart.cudaStreamSynchronize(stream))
            for name, ptr in zip(self.outputs, allocations[len(self.inputs) :], strict=True):
                out = results[name]
                _check(
                    cudart.cudaMemcpy(
                        out.ctypes.data,
                        ptr,
                        out.nbytes,
                        cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                    )
                )
            return results
        finally:
            for ptr in allocations:
                cudart.cudaFree(ptr)
            cudart.cudaStreamDestroy(stream)
