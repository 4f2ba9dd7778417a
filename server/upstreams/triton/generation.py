"""Generation on a Triton replica: the LLM variants' python-backend models (decoupled), called
with ``ModelStreamInfer`` on the replica's raw gRPC channel.

One stream per request: the request (``text_input``, ``stream`` true, ``sampling_parameters``
as JSON, ``triton_enable_empty_final_response`` so the end is known) goes out, and each response
(``text_output``, ``finish_reason``, ``num_input_tokens``, ``num_output_tokens``) becomes a
:class:`common.llm.Chunk` until the one flagged ``triton_final_response``. ``generate`` waits
for the first response, so a request the model refuses is an error before any text, as the
embedded upstream's. Cancelling the generation cancels the stream (Triton then cancels the
request in the python backend, which stops between tokens when the model checks
``is_cancelled()``).

A model's in-stream errors carry no status code: one that names the context length is the
client's (``context_length_exceeded``), one that names a request field (``'max_tokens' ...``, as
common.llm words them) is INVALID_ARGUMENT; anything else is an engine failure. Chat messages
need the model's chat template, which the model holds there: they go as the ``messages``
request parameter (JSON), with ``fit_max_tokens`` when the client left ``max_tokens`` out, and
the model renders them (common/llm/triton_model.py).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from common.llm import Chunk
from common.llm.triton_model import PARAM_FIT_MAX_TOKENS, PARAM_MESSAGES
from server.catalog import Variant
from server.errors import (
    CONTEXT_LENGTH_EXCEEDED,
    GatewayError,
    InternalError,
    InvalidGeneration,
)
from server.upstreams.generation import GenerationRequest

MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"
# common.llm's words name the field first: "'max_tokens' must be ..."; the builder's Triton
# model puts "model 'NAME': " before them
_FIELD = re.compile(r"(?:^|: )'(\w+)' ")


def stream_request(variant: Variant, request: GenerationRequest) -> bytes:
    """The serialised ModelInferRequest for one generation."""
    r = pb.ModelInferRequest(model_name=variant.name, model_version="")
    r.parameters[EMPTY_FINAL].bool_param = True
    if request.messages is not None:
        r.parameters[PARAM_MESSAGES].string_param = json.dumps(list(request.messages))
        r.parameters[PARAM_FIT_MAX_TOKENS].bool_param = request.fit_max_tokens
    for name, datatype, raw in (
        ("text_input", "BYTES", _bytes(request.prompt or "")),
        ("stream", "BOOL", b"\x01"),
        ("sampling_parameters", "BYTES", _bytes(request.params.to_json())),
    ):
        r.inputs.add(name=name, datatype=datatype, shape=[1])
        r.raw_input_contents.append(raw)
    return r.SerializeToString()


def _bytes(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(4, "little") + data


def model_error(variant: Variant, message: str) -> GatewayError:
    """A model's in-stream error as the gateway's (module docstring)."""
    if "maximum context length" in message:
        return InvalidGeneration(message, "max_tokens", CONTEXT_LENGTH_EXCEEDED)
    field = _FIELD.search(message)
    if field:
        return InvalidGeneration(message, field.group(1))
    return InternalError(f"{variant.name}: {message}")


def _output(response: pb.ModelInferResponse, name: str) -> Any:
    for i, t in enumerate(response.outputs):
        if t.name == name and i < len(response.raw_output_contents):
            raw = response.raw_output_contents[i]
            if t.datatype == "BYTES":
                size = int.from_bytes(raw[:4], "little")
                return raw[4 : 4 + size].decode()
            return int(np.frombuffer(raw, dtype=np.uint32)[0])
    return None


class TritonGeneration:
    """One request's stream on a replica (module docstring)."""

    def __init__(self, variant: Variant, call: Any, propagate: bool) -> None:
        self.variant = variant
        self._propagate = propagate
        self._drains: set[asyncio.Task[None]] = set()
        self.prompt_tokens = 0
        self._call = call
        self._responses = call.__aiter__()
        self._first: Chunk | None = None
        self._done = False

    def _chunk(self, raw: bytes) -> Chunk | None:
        """The response's chunk; None for the final (empty) response."""
        message = pb.ModelStreamInferResponse.FromString(raw)
        if message.error_message:
            raise model_error(self.variant, message.error_message)
        response = message.infer_response
        final = FINAL in response.parameters and response.parameters[FINAL].bool_param
        if final and not response.outputs:
            return None
        self.prompt_tokens = _output(response, "num_input_tokens") or self.prompt_tokens
        text = _output(response, "text_output") or ""
        tokens = _output(response, "num_output_tokens") or 0
        return Chunk(text, tokens, _output(response, "finish_reason") or None)

    async def start(self) -> None:
        """Wait for the first response (errors before any text are raised here)."""
        self._first = await self._next()

    async def _next(self) -> Chunk | None:
        try:
            raw = await self._responses.__anext__()
        except StopAsyncIteration:
            return None
        return self._chunk(raw)

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            chunk = self._first
            while chunk is not None:
                yield chunk
                if chunk.finish_reason is not None:
                    break
                chunk = await self._next()
            while chunk is not None:  # the empty final response: the stream ends cleanly
                chunk = await self._next()
            self._done = True
        finally:
            if not self._done:
                self.cancel()

    def cancel(self) -> None:
        if self._done:
            return
        self._done = True
        if self._propagate:
            self._call.cancel()
            return
        task = asyncio.ensure_future(self._drain())
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self) -> None:
        """Read the stream to its end, dropping the text (``cancel=detach``)."""
        try:
            async for _ in self._responses:
                pass
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass


async def open_generation(
    channel: grpc.aio.Channel, variant: Variant, request: GenerationRequest, propagate: bool
) -> TritonGeneration:
    """Send the request on a new stream and wait for its first response; AioRpcError when the
    replica cannot take it."""
    payload = stream_request(variant, request)
    method = channel.stream_stream(
        MODEL_STREAM_INFER, request_serializer=None, response_deserializer=None
    )
    call = method(iter([payload]))
    generation = TritonGeneration(variant, call, propagate)
    try:
        await generation.start()
    except (Exception, asyncio.CancelledError):
        call.cancel()
        raise
    return generation


__all__ = ["TritonGeneration", "model_error", "open_generation", "stream_request"]
