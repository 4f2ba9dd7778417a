"""Give the heap memory a large request freed back to the operating system.

gRPC receives a message into many small buffers that its own threads allocate. glibc's malloc
serves each thread from one of up to 8 x cores arenas (a thread moves to another arena when the
one it used is locked by a busy neighbour, so a loaded host uses more of them); an arena's heap
returns freed memory to the system only from its top. After a 60 MB request those buffers are
free but their pages stay resident, up to 64 MiB per arena: measured +100 to +240 MiB of VmRSS
after 50 rejected 60 MB requests on a busy 2-core host, none of it reachable (issue 33).
Two remedies, both glibc's and both no-ops elsewhere: :func:`limit_arenas` (``mallopt
M_ARENA_MAX``), called once when a gateway process starts, before gRPC's threads exist, bounds
how many arenas can each keep such pages (the cause); ``malloc_trim(0)`` (:func:`trim`) returns
every arena's free pages (``madvise``) after a large request the gateway read itself. Messages
gRPC's C core refuses for their size never reach Python, so only the arena bound covers them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

# requests at least this large trim the heap once they are answered (server/transports/grpc)
TRIM_AFTER_BYTES = 16 * 1024 * 1024
# malloc arenas a gateway process may use: its threads (gRPC's, the engines') share one heap
# instead of up to 8 per core, so freed receive buffers are not held in many at once (measured:
# 50 rejected 60 MB requests on a busy 2-core host, +25 MiB with one arena against +160 and
# +242 MiB with glibc's default; docs/lab/hardening.md)
GATEWAY_ARENAS = 1
M_ARENA_MAX = -8  # glibc's mallopt parameter


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    fn = getattr(_libc(), "malloc_trim", None)  # absent outside glibc
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def limit_arenas(count: int = GATEWAY_ARENAS) -> bool:
    """Let this process's threads share at most ``count`` malloc arenas (threads that already
    have one keep it: call it before starting any); True where the C library took it."""
    mallopt = getattr(_libc(), "mallopt", None)  # absent outside glibc
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_ARENA_MAX, count))


def available() -> bool:
    """Whether this C library has ``malloc_trim`` (glibc)."""
    return _malloc_trim() is not None


def trim() -> bool:
    """Return the free pages of every malloc arena to the system; True if any were."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
