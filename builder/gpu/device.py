"""Is this a GPU host? What GPU is it? Torch-free: the CUDA driver is asked through ``ctypes``.

``check_gpu_available()`` is what ``--target gpu`` calls first: ``None`` when an engine can be
built here, otherwise ONE line saying what is missing and how to install the extra.
"""

from __future__ import annotations

import ctypes
import importlib.util
from dataclasses import asdict, dataclass

from builder.gpu.errors import INSTALL_HINT, GpuUnavailableError

_CUDA_LIBS = ("libcuda.so.1", "libcuda.so", "nvcuda.dll")
_ATTR_CC_MAJOR = 75  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
_ATTR_CC_MINOR = 76  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR


@dataclass(frozen=True)
class GpuInfo:
    """The GPU an engine is built on (plans only run on the same compute capability)."""

    index: int
    name: str
    compute_capability: str  # "9.0"
    total_memory_bytes: int
    driver_version: str  # "12.8"

    @property
    def sm(self) -> str:
        """``"90"`` for compute capability 9.0 (used in plan file names: ``model_sm90.plan``)."""
        return self.compute_capability.replace(".", "")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _load_driver() -> ctypes.CDLL | None:
    for name in _CUDA_LIBS:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def _cuda_problem() -> str | None:
    """Why the CUDA driver cannot be used here, or None."""
    lib = _load_driver()
    if lib is None:
        return "no CUDA driver (libcuda.so.1 not found)"
    rc = lib.cuInit(0)
    if rc != 0:
        return f"the CUDA driver did not initialise (cuInit error {rc}; no GPU visible?)"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value < 1:
        return "no CUDA GPU visible (cuDeviceGetCount = 0)"
    return None


def check_gpu_available() -> str | None:
    """None when TensorRT engines can be built here, else one line naming what is missing."""
    missing = []
    if importlib.util.find_spec("tensorrt") is None:
        missing.append("the TensorRT Python package (tensorrt) is not installed")
    cuda = _cuda_problem()
    if cuda:
        missing.append(cuda)
    if not missing:
        return None
    return (
        f"--target gpu cannot build TensorRT engines on this host: {'; '.join(missing)}. "
        f"On a GPU host run: {INSTALL_HINT} (or use --configs-only to write the GPU configs "
        "and ONNX inputs without engines)"
    )


def require_gpu() -> None:
    """Raise :class:`GpuUnavailableError` with the one-line message when this is no GPU host."""
    problem = check_gpu_available()
    if problem:
        raise GpuUnavailableError(problem)


def gpu_info(index: int = 0) -> GpuInfo:
    """Name, compute capability and memory of GPU ``index`` (as CUDA_VISIBLE_DEVICES sees it)."""
    lib = _load_driver()
    if lib is None or lib.cuInit(0) != 0:
        raise GpuUnavailableError(check_gpu_available() or "the CUDA driver is not usable")
    dev = ctypes.c_int(0)
    if lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
        raise GpuUnavailableError(f"CUDA device {index} does not exist on this host")
    name = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(name, 256, dev)
    major, minor = ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetAttribute(ctypes.byref(major), _ATTR_CC_MAJOR, dev)
    lib.cuDeviceGetAttribute(ctypes.byref(minor), _ATTR_CC_MINOR, dev)
    mem = ctypes.c_size_t(0)
    lib.cuDeviceTotalMem_v2(ctypes.byref(mem), dev)
    drv = ctypes.c_int(0)
    lib.cuDriverGetVersion(ctypes.byref(drv))
    return GpuInfo(
        index=index,
        name=name.value.decode(errors="replace"),
        compute_capability=f"{major.value}.{minor.value}",
        total_memory_bytes=int(mem.value),
        driver_version=f"{drv.value // 1000}.{(drv.value % 1000) // 10}",
    )
