"""common.heap: glibc's malloc_trim, reached through ctypes (the gateway calls it after large
gRPC requests; the memory it returns is measured in tests/server/test_hardening_grpc.py)."""

from __future__ import annotations

import platform

from common import heap


def test_trim_is_available_on_glibc_and_returns_whether_it_released_pages():
    if platform.libc_ver()[0] == "glibc":
        assert heap.available()
    assert heap.trim() in (True, False)
