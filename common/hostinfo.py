"""What this host's CPU is: recorded by the builder in every manifest, compared by the gateway
with the manifest's at start-up (server/routing/retime.py). The builder's precision checks
(builder/hostinfo.py) build on it; it lives here because the gateway cannot import the builder.
"""

from __future__ import annotations

import functools
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def host_differences(recorded: Mapping[str, Any], here: Mapping[str, Any]) -> list[str]:
    """How host ``here`` differs from the ``recorded`` one (a manifest's ``host``), one short
    phrase per difference: CPU model, ISA flags, logical cores. Empty: the same host kind."""
    if not recorded:
        return ["the build host is not recorded"]
    out = []
    if recorded.get("model") != here.get("model"):
        out.append(f"CPU {recorded.get('model')!r} -> {here.get('model')!r}")
    old_flags, new_flags = set(recorded.get("flags") or []), set(here.get("flags") or [])
    if old_flags != new_flags:
        gained, lost = sorted(new_flags - old_flags), sorted(old_flags - new_flags)
        change = [*(f"+{f}" for f in gained), *(f"-{f}" for f in lost)]
        out.append(f"ISA flags {' '.join(change)}")
    if recorded.get("cores") != here.get("cores"):
        out.append(f"cores {recorded.get('cores')} -> {here.get('cores')}")
    return out


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS does not report one)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return 0.0


def busy(load: float, cores: int) -> bool:
    """A host is busy when its load average is over its logical core count: timings taken then
    share the cores with other work and are noisy."""
    return load > max(1, cores)


def busy_phrase(load: float, cores: int) -> str:
    return f"load average {load:.2f} over {cores} cores"
