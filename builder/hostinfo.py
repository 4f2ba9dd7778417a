"""What this host's CPU can do: recorded in every manifest and used to pick precisions.

``cpu_info`` and the flag list live in common/hostinfo.py (the gateway compares its host with
the manifest's at start-up); the checks below read ``cpu_info`` through this module, so tests
can patch ``builder.hostinfo.cpu_info`` (and ``load_average``, which the engine choice reads).
"""

from __future__ import annotations

from common.hostinfo import INTERESTING_FLAGS, busy, cpu_info, load_average

__all__ = [
    "INTERESTING_FLAGS",
    "busy",
    "cpu_info",
    "has_flag",
    "load_average",
    "supports_bf16",
    "supports_vnni",
]


def has_flag(flag: str) -> bool:
    return flag in cpu_info()["flags"]  # type: ignore[operator]


def supports_bf16() -> bool:
    """True where the CPU executes BF16 natively (AMX-BF16 or AVX512-BF16)."""
    return has_flag("amx_bf16") or has_flag("avx512_bf16")


def supports_vnni() -> bool:
    return has_flag("avx512_vnni") or has_flag("avx_vnni") or has_flag("amx_int8")
