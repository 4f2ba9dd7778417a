"""What this host's CPU can do: recorded in every manifest and used to pick precisions."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

# ISA flags that decide which precision/engine is fastest on x86 CPUs.
INTERESTING_FLAGS = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_int8",
    "amx_bf16",
)


@functools.cache
def cpu_info() -> dict[str, object]:
    """CPU model, logical cores and the ISA flags in INTERESTING_FLAGS that this CPU reports."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and value.strip():
                model = value.strip()
            elif key == "flags":
                flags = set(value.split())
    return {
        "model": model,
        "machine": platform.machine(),
        "cores": os.cpu_count() or 1,
        "flags": sorted(f for f in INTERESTING_FLAGS if f in flags),
    }


def has_flag(flag: str) -> bool:
    return flag in cpu_info()["flags"]  # type: ignore[operator]


def supports_bf16() -> bool:
    """True where the CPU executes BF16 natively (AMX-BF16 or AVX512-BF16)."""
    return has_flag("amx_bf16") or has_flag("avx512_bf16")


def supports_vnni() -> bool:
    return has_flag("avx512_vnni") or has_flag("avx_vnni") or has_flag("amx_int8")
