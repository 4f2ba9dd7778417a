"""Triton's ``ModelStreamInfer``: a bidirectional stream of ModelInferRequests.

Each request in the stream goes through the unary ModelInfer path as it is (routing, the
precision parameter, pass-through to a Triton upstream, auth from the stream's metadata, the
stream's deadline), so the two never drift apart. Following Triton's stream handler
(``src/grpc/stream_infer_handler.cc``) for models that are not decoupled - none of the gateway's
are:

- requests are read and run concurrently (up to :data:`MAX_IN_FLIGHT` per stream, then reading
  waits), and responses are written in the order the requests arrived;
- a request that fails does not end the stream: its response is a ``ModelStreamInferResponse``
  with ``error_message`` set and an ``infer_response`` holding only the request's ``id``;
- the stream ends OK once the client has closed its side and every response is written.

With a Triton upstream each request is forwarded on its own (unary ModelInfer to the picked
replica), so fallback and replica retry work per request as they do for unary calls.

A request to a decoupled model (an LLM, server/transports/grpc/decoupled.py) has many responses:
they are written as they come, after those of the requests before it (in arrival order, as
above; its generation runs meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from server.transports.grpc.contents import varint

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64  # requests of one stream running at once
_INFER_RESPONSE_TAG = b"\x12"  # ModelStreamInferResponse.infer_response: field 2, bytes

# (serialised ModelInferRequest, per-request context) -> serialised ModelInferResponse
UnaryInfer = Callable[[bytes, Any], Awaitable[bytes]]
# (serialised ModelInferRequest, per-request context) -> its serialised
# ModelStreamInferResponses when it is for a decoupled model, else None
Decoupled = Callable[[bytes, Any], AsyncIterator[bytes] | None]
_END = object()


class _Failed(Exception):
    """A request of the stream was answered with a status (what ``abort`` would have sent)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _RequestContext:
    """What the unary handler uses of a ServicerContext, for one request of a stream: the
    stream's deadline and metadata; an abort becomes this request's in-stream error."""

    def __init__(self, stream: grpc.aio.ServicerContext) -> None:
        self._stream = stream

    def time_remaining(self) -> float | None:
        return self._stream.time_remaining()

    def invocation_metadata(self) -> Any:
        return self._stream.invocation_metadata()

    def set_trailing_metadata(self, metadata: Any) -> None:
        """Per-request metadata has no place in a stream: the precision is in the response."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        raise _Failed(code, details)


def wrap_response(infer_response: bytes) -> bytes:
    """A serialised ModelInferResponse as a serialised ModelStreamInferResponse (no copy into
    a message and back)."""
    return _INFER_RESPONSE_TAG + varint(len(infer_response)) + infer_response


def error_response(request: bytes, message: str) -> bytes:
    """Triton's in-stream error: ``error_message`` and the failed request's ``id``."""
    try:
        request_id = pb.ModelInferRequest.FromString(request).id
    except DecodeError:
        request_id = ""
    response = pb.ModelStreamInferResponse(error_message=message)
    response.infer_response.id = request_id
    return response.SerializeToString()


async def _answer(infer: UnaryInfer, request: bytes, ctx: _RequestContext) -> bytes:
    try:
        return wrap_response(await infer(request, ctx))
    except _Failed as e:
        return error_response(request, e.details)


async def _pump(responses: AsyncIterator[bytes], out: asyncio.Queue[Any]) -> None:
    """Run a decoupled request's responses into ``out`` (ended by ``_END``)."""
    try:
        async for response in responses:
            await out.put(response)
    finally:
        out.put_nowait(_END)


class _Pending:
    """A request of the stream: its task and how its responses are read."""

    def __init__(self, task: asyncio.Future[Any], queue: asyncio.Queue[Any] | None) -> None:
        self.task = task
        self.queue = queue

    async def responses(self) -> AsyncIterator[bytes]:
        if self.queue is None:
            yield await self.task
            return
        while (item := await self.queue.get()) is not _END:
            yield item
        await self.task  # an error of the pump ends the RPC with it


def stream_handler(
    infer: UnaryInfer, decoupled: Decoupled | None = None
) -> Callable[[AsyncIterator[bytes], grpc.aio.ServicerContext], AsyncIterator[bytes]]:
    """The ModelStreamInfer handler (bytes in, bytes out) over a unary ModelInfer handler (and
    the decoupled models' handler)."""

    def start(request: bytes, ctx: _RequestContext) -> _Pending:
        many = decoupled(request, ctx) if decoupled is not None else None
        if many is None:
            return _Pending(asyncio.ensure_future(_answer(infer, request, ctx)), None)
        queue: asyncio.Queue[Any] = asyncio.Queue(MAX_IN_FLIGHT)
        return _Pending(asyncio.ensure_future(_pump(many, queue)), queue)

    async def model_stream_infer(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        ctx = _RequestContext(context)
        pending: asyncio.Queue[_Pending | None] = asyncio.Queue(MAX_IN_FLIGHT)

        async def read() -> None:
            try:
                async for request in requests:
                    await pending.put(start(request, ctx))
            finally:
                await pending.put(None)

        reader = asyncio.ensure_future(read())
        current: _Pending | None = None
        try:
            while (current := await pending.get()) is not None:
                async for response in current.responses():
                    yield response
            await reader  # a read error (the client broke the stream) ends the RPC with it
        finally:
            reader.cancel()
            if current is not None:
                current.task.cancel()
            while not pending.empty():
                leftover = pending.get_nowait()
                if leftover is not None:
                    leftover.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader

    return model_stream_infer


__all__ = ["MAX_IN_FLIGHT", "error_response", "stream_handler", "wrap_response"]
