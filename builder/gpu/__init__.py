"""GPU hosts: TensorRT engines and GPU Triton configs for the variants the builder made.

Nothing here imports ``tensorrt`` or CUDA at import time; the heavy imports live inside the
functions that need them, so CPU hosts import this package (and run its tests) without the
``[gpu]`` extra. The entry point the CLI calls is :func:`builder.gpu.target.build_gpu_target`.
"""

from __future__ import annotations

from builder.gpu.errors import EngineBuildError, GpuUnavailableError, GpuVariantError

__all__ = ["EngineBuildError", "GpuUnavailableError", "GpuVariantError"]
