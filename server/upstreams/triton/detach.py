"""Waiting for a Triton call without ever cancelling it (``--triton-cancellation detach``).

tritonserver before r24.12 (2.53) can die with SIGSEGV when a ModelInfer call is cancelled - by
the client, or by its gRPC deadline - while its response completes: a race in Triton's gRPC
infer handler (triton-inference-server/server#7368 and #7472, backtraces in
``pthread_mutex_lock`` from ``Context::IsCancelled`` on a null context; fixed by PR #7840). The
tritonserver the project tests with (nvidia-pytriton 0.7.0's, 2.51) has it; the Triton soak met
it (docs/lab/incidents/). A gateway in front of Triton would turn every client cancellation and
deadline into such a cancellation. Detached, the gateway still stops waiting when its client
cancels or the deadline passes (the client is answered exactly as before), but the call to
Triton runs to its end, bounded by what was left of the deadline plus ``slack_s`` - long enough
that Triton answers first. ``propagate`` (Tritons with the fix) cancels as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from server.errors import DeadlineExceeded

_T = TypeVar("_T")
MODES = ("detach", "propagate")
# the first tritonserver release without the crash (r24.12, PR #7840)
FIXED_IN = (2, 53)


def crashes_on_cancel(version: str) -> bool:
    """Whether a tritonserver of ``version`` (ServerMetadata's, ``2.51.0``) has the crash on
    cancelled calls. A version that does not parse is taken as fixed (newer servers, other
    KServe-v2 servers)."""
    parts = version.strip().split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return False
    return (major, minor) < FIXED_IN


def _expire(proxy: asyncio.Future, what: str) -> None:
    if not proxy.done():
        proxy.set_exception(DeadlineExceeded(f"deadline exceeded while {what} ran"))


def _settle(proxy: asyncio.Future, call: asyncio.Future) -> None:
    """The call ended: hand its outcome to the waiter, or drop it when nobody waits."""
    if call.cancelled():
        if not proxy.done():
            proxy.cancel()
        return
    error = call.exception()  # retrieved either way: no "never retrieved" warnings
    if proxy.done():
        return
    if error is not None:
        proxy.set_exception(error)
    else:
        proxy.set_result(call.result())


async def detached(
    start: Callable[[float], Awaitable[_T]], remaining_s: float, slack_s: float, what: str
) -> _T:
    """``start(timeout)``'s result, waiting at most ``remaining_s``; the call gets a timeout of
    ``remaining_s + slack_s`` and is never cancelled by this waiter's cancellation or deadline."""
    loop = asyncio.get_running_loop()
    call = asyncio.ensure_future(start(remaining_s + slack_s))
    proxy: asyncio.Future = loop.create_future()
    call.add_done_callback(lambda c: _settle(proxy, c))
    timer = loop.call_later(remaining_s, _expire, proxy, what)
    try:
        return await proxy
    finally:
        timer.cancel()
