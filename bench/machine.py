"""The machine a benchmark ran on: CPU, ISA flags, cores, package versions, load, and its CPU
class (results are kept per class: ``docs/benchmarks/<class>.md`` + ``.json``)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from collections.abc import Iterable
from typing import Any

from builder import hostinfo

PACKAGES = (
    "onnxruntime",
    "openvino",
    "numpy",
    "grpcio",
    "tritonclient",
    "onnx",
    "nvidia-pytriton",
    "torch",
)


# The CPU classes results are kept under, most capable first (see cpu_class).
CPU_CLASSES = ("intel-amx", "avx512", "avx2")


def cpu_class(flags: Iterable[str]) -> str:
    """``intel-amx`` when the CPU reports AMX (``amx_tile`` or ``amx_bf16``), ``avx512`` for
    AVX512 without AMX, ``avx2`` otherwise (AVX2-only hosts and anything older)."""
    have = set(flags)
    if have & {"amx_tile", "amx_bf16"}:
        return "intel-amx"
    if any(f.startswith("avx512") for f in have):
        return "avx512"
    return "avx2"


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def describe() -> dict[str, Any]:
    """CPU model, ISA flags (builder.hostinfo), cores, Python and package versions, load now."""
    cpu = dict(hostinfo.cpu_info())
    return {
        "cpu_class": cpu_class(cpu["flags"]),  # type: ignore[arg-type]
        "cpu_model": cpu["model"],
        "machine": cpu["machine"],
        "cores": cpu["cores"],
        "isa_flags": list(cpu["flags"]),  # type: ignore[arg-type]
        "checked_flags": list(hostinfo.INTERESTING_FLAGS),
        "python": platform.python_version(),
        "packages": package_versions(),
        "load_average_start": load_average(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
