"""Give the heap memory a large request freed back to the operating system.

gRPC receives a message into many small buffers that its own threads allocate. glibc's malloc
serves each thread from one of up to 8 x cores arenas (a thread moves to another arena when the
one it used is locked by a busy neighbour, so a loaded host uses more of them); an arena's heap
returns freed memory to the system only from its top. After a 60 MB request those buffers are
free but their pages stay resident, up to 64 MiB per arena: measured +100 to +240 MiB of VmRSS
after 50 rejected 60 MB requests on a busy 2-core host, none of it reachable (issue 33).
``malloc_trim(0)`` returns every arena's free pages (``madvise``); elsewhere than glibc it is
absent and :func:`trim` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

# requests at least this large trim the heap once they are answered (server/transports/grpc)
TRIM_AFTER_BYTES = 16 * 1024 * 1024


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def available() -> bool:
    """Whether this C library has ``malloc_trim`` (glibc)."""
    return _malloc_trim() is not None


def trim() -> bool:
    """Return the free pages of every malloc arena to the system; True if any were."""
    fn = _malloc_trim()
    return bool(fn(0)) if fn is not None else False
