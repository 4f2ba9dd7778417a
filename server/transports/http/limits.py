"""What an HTTP client may cost the gateway: body size, body time, JSON size, connections.

* :func:`read_body`: ``Content-Length`` is checked against ``--max-request-bytes`` (413) and
  against what the model's inputs could need as JSON (400, naming the inputs) *before* a byte is
  read; the body must arrive within ``--http-body-timeout`` (408).
* :func:`json_bound`: the most bytes a JSON request for a model can sensibly need, from its
  inputs' largest shapes (fixed dims; the manifest's ``max_shape`` for dynamic ones) and
  ``max_batch_size`` (None when a dynamic dim has no ``max_shape`` or an input is BYTES: then
  only the request limit applies).
* :func:`off_loop`: large bodies are parsed (JSON, then numpy arrays) in a parser process,
  so health probes and small requests are not stuck behind them.
* :class:`CappedSite`: a TCP site that answers 503 and closes beyond ``--http-max-connections``
  and closes connections whose request headers do not arrive within ``--http-body-timeout``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing as mp
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from aiohttp import web

from server import metrics
from server.catalog import Repository, Variant
from server.dataplane import wording
from server.errors import (
    BodyTimeout,
    InternalError,
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
)
from server.transports.request_bounds import largest_dims

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# A JSON number with its separator ("-1.2345678901234567e-05, ") plus pretty-printing room.
JSON_BYTES_PER_ELEMENT = 48
JSON_OVERHEAD_BYTES = 64 * 1024  # names, shapes, parameters, outputs
OFF_LOOP_BYTES = 256 * 1024  # bodies above this are parsed in a parser process
PARSER_PROCESSES = 1  # one core at most goes to parsing large bodies
DEFAULT_MAX_CONNECTIONS = 1000  # per process; under the usual 1024 open-file limit


def _variants(repository: Repository, name: str) -> list[Variant]:
    model = repository.models.get(name)
    if model is not None:
        return list(model.variants.values())
    variant = repository.variant(name)
    return [variant] if variant is not None else []


def json_bound(repository: Repository, name: str) -> tuple[int, str] | None:
    """(most bytes, what they are for) of a JSON body for model ``name``; None: no bound."""
    best: tuple[int, str] | None = None
    for variant in _variants(repository, name):
        rows = max(1, variant.max_batch_size)
        total, parts = JSON_OVERHEAD_BYTES, []
        for t in variant.inputs:
            largest = largest_dims(t)  # a dynamic dim counts at its manifest max_shape
            if t.datatype == "BYTES" or largest is None:
                return None
            total += rows * math.prod(largest) * JSON_BYTES_PER_ELEMENT
            dims = ([-1] if variant.max_batch_size > 0 else []) + list(largest)
            parts.append(f"{t.name!r} {t.datatype} {dims}")
        batch = f" up to batch {variant.max_batch_size}" if variant.max_batch_size > 0 else ""
        if best is None or total > best[0]:
            best = (total, f"input(s) {', '.join(parts)}{batch}")
    return best


def check_size(repository: Repository, name: str, size: int, limit: int, binary: bool) -> None:
    """Reject a body of ``size`` bytes before it is read or parsed: over the request limit
    (413) or far over what a JSON request for ``name`` could need (400). ``binary``: the
    binary-tensor extension (its tensors are raw; their sizes are checked against the header)."""
    if size > limit:
        raise PayloadTooLarge(f"request body is {size} bytes, over the limit of {limit}")
    bound = None if binary else json_bound(repository, name)
    if bound is not None and size > bound[0]:
        raise InvalidInput(
            f"request body is {size} bytes; as JSON, {bound[1]} of model {name!r} need at most "
            f"{bound[0]} bytes"
        )


async def read_body(
    request: web.Request, repository: Repository, limit: int, timeout_s: float
) -> bytes:
    """The body of an inference request, after the size checks, within ``timeout_s``."""
    name = request.match_info.get("model", "")
    if name and not _variants(repository, name):
        raise ModelNotFound(wording.unknown_model(name))
    binary = "Inference-Header-Content-Length" in request.headers
    if request.content_length is not None:
        check_size(repository, name, request.content_length, limit, binary)
    try:
        body = await asyncio.wait_for(request.read(), timeout_s)
    except TimeoutError:
        raise BodyTimeout(
            f"request body not received within {timeout_s:g} s (--http-body-timeout)"
        ) from None
    check_size(repository, name, len(body), limit, binary)  # chunked bodies have no length
    return body


_pool: ProcessPoolExecutor | None = None


def _parser_pool() -> ProcessPoolExecutor:
    global _pool
    if _pool is None:  # started on the first large body: most gateways never need it
        _pool = ProcessPoolExecutor(PARSER_PROCESSES, mp_context=mp.get_context("spawn"))
    return _pool


async def off_loop(size: int, parse: Callable[..., _T], *args: Any) -> _T:
    """``parse(*args)`` here for a small body; for a large one in the parser process (a thread
    would not do: CPython's JSON parser holds the GIL, and the event loop with it). ``parse``
    must be a module-level function whose arguments and result pickle."""
    global _pool
    if size <= OFF_LOOP_BYTES:
        return parse(*args)
    try:
        return await asyncio.get_running_loop().run_in_executor(_parser_pool(), parse, *args)
    except BrokenProcessPool:
        _pool = None
        raise InternalError("the request parser process exited; it is restarted") from None


def shutdown_parsers() -> None:
    """Stop the parser process (the gateway's close)."""
    global _pool
    if _pool is not None:
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


class _Refused(asyncio.Protocol):
    """Answers 503 and closes: the connection is over ``--http-max-connections``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        body = f'{{"error": "too many connections (limit {self.limit})"}}'.encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        transport.write(head + body)  # type: ignore[attr-defined]
        transport.close()


def _drop_if_silent(handler: Any, timeout_s: float) -> None:
    # ``_request_count`` counts the requests whose headers aiohttp parsed on this connection
    if handler._request_count == 0 and handler.transport is not None:
        log.info("closing a connection that sent no complete request in %g s", timeout_s)
        handler.transport.close()


class CappedSite(web.TCPSite):
    """``web.TCPSite`` whose listener refuses connections beyond ``max_connections`` (0: no
    cap) with a 503, counted in ``precision_serve_http_connections_rejected_total``, and closes
    a connection whose first request's headers are not complete within ``header_timeout_s``
    (slow-header clients; the body has its own timeout in :func:`read_body`)."""

    def __init__(
        self,
        runner: web.BaseRunner,
        *args: Any,
        max_connections: int = 0,
        header_timeout_s: float | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(runner, *args, **kw)
        self._max_connections = max_connections
        self._header_timeout_s = header_timeout_s

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        limit, timeout_s = self._max_connections, self._header_timeout_s
        loop = asyncio.get_running_loop()

        def factory() -> asyncio.Protocol:
            if limit and len(server.connections) >= limit:
                metrics.HTTP_CONNECTIONS_REJECTED.inc()
                return _Refused(limit)
            handler = server()
            if timeout_s:
                loop.call_later(timeout_s, _drop_if_silent, handler, timeout_s)
            return handler

        self._server = await loop.create_server(
            factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )
        self._bound_port = self._server.sockets[0].getsockname()[1]
