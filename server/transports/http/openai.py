"""The OpenAI-compatible API for decoder LLM variants: ``GET /v1/models[/{model}]``,
``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true`` as server-sent
events ``data: {...}`` ... ``data: [DONE]``), over the one generation path
(server/dataplane/generation.py). docs/llm-serving.md is the manual.

The precision: ``model: "tinyllm:int4"`` or the variant's name ``"tinyllm_int4"`` chooses it;
for ``"tinyllm"`` the ``x-precision`` header, else the model's routing policy. The response's
``model`` is the served variant as ``model:precision`` and its ``x-precision`` header the
precision.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``;
:func:`error_response` is the one mapping of gateway errors (common.llm's are translated to
them in server/errors.py) to it, used by the HTTP app's error middleware for every ``/v1/``
path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import time
from typing import Any

from aiohttp import ClientConnectionResetError, web

from common.llm import Chunk, LlmRequestError, SamplingParams
from server.catalog import LLM
from server.dataplane.gateway import PRECISION_HEADER, PRECISION_PARAMETER, Gateway
from server.dataplane.generation import GenerateRequest, TextStream, start_generation
from server.errors import (
    ClientDisconnected,
    GatewayError,
    InvalidGeneration,
    InvalidInput,
    ModelNotFound,
    client_message,
    from_llm_error,
)
from server.transports.http.limits import read_body
from server.upstreams.generation import GenerationRequest

log = logging.getLogger(__name__)

PREFIX = "/v1/"
CLIENT_GONE = (ConnectionError, ClientConnectionResetError)
OWNER = "precision-serve"
MODEL_NOT_FOUND = "model_not_found"

# gRPC code name -> (HTTP status, OpenAI error type)
_STATUS = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "NOT_FOUND": (404, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "invalid_request_error"),
    "RESOURCE_EXHAUSTED": (413, "invalid_request_error"),
    "UNIMPLEMENTED": (400, "invalid_request_error"),
    "UNAVAILABLE": (503, "server_error"),
    "DEADLINE_EXCEEDED": (504, "server_error"),
    "CANCELLED": (499, "invalid_request_error"),
}


def error_body(message: str, kind: str, param: str | None, code: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    error: BaseException, message: str, http_status: int | None = None
) -> web.Response:
    """The one gateway-error -> OpenAI error mapping (``message``: what the client may see,
    server/errors.py ``client_message``)."""
    if isinstance(error, GatewayError):
        status, kind = _STATUS.get(error.code, (500, "server_error"))
        status = error.http_status or status
        code = error.reason
        if error.code == "NOT_FOUND":
            code = MODEL_NOT_FOUND
        elif error.code == "UNAUTHENTICATED":
            code = "invalid_api_key"
        elif error.code == "UNAVAILABLE":
            code = code or "server_overloaded"
        param = error.param or ("model" if error.code == "NOT_FOUND" else None)
    else:
        status, kind, code, param = 500, "server_error", None, None
    if http_status is not None:
        status = http_status
    headers = {"retry-after": "1"} if status == 503 else None
    return web.json_response(error_body(message, kind, param, code), status=status, headers=headers)


_GATEWAY = web.AppKey("openai_gateway", Gateway)
_STARTED = web.AppKey("openai_started", int)
_BODY_TIMEOUT = web.AppKey("openai_body_timeout", float)


def _gw(request: web.Request) -> Gateway:
    return request.app[_GATEWAY]


# ---- /v1/models ---------------------------------------------------------------------------
def _model_entry(name: str, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": OWNER}


def _listing(gw: Gateway) -> list[str]:
    """Each LLM's logical name, then its ``model:precision`` names (most accurate first)."""
    names = []
    for model in gw.repository.models.values():
        if model.kind != LLM:
            continue
        names.append(model.name)
        names += [model.variants[p].openai_name for p in model.precisions()]
    return names


async def list_models(request: web.Request) -> web.Response:
    created = _created(request)
    data = [_model_entry(n, created) for n in _listing(_gw(request))]
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    name = request.match_info["model"]
    if name not in _listing(_gw(request)):
        raise ModelNotFound(_no_model(name))
    return web.json_response(_model_entry(name, _created(request)))


def _created(request: web.Request) -> int:
    return request.app[_STARTED]


def _no_model(name: str) -> str:
    return f"The model `{name}` does not exist or you do not have access to it."


# ---- request parsing ----------------------------------------------------------------------------
async def _body(request: web.Request) -> dict[str, Any]:
    gw = _gw(request)  # the size limit and --http-body-timeout, as for inference
    raw = await read_body(request, gw.repository, gw.max_request_bytes, request.app[_BODY_TIMEOUT])
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InvalidInput(
            "We could not parse the JSON body of your request. The OpenAI API expects a JSON "
            "payload, but what was sent was not valid JSON."
        ) from None
    if not isinstance(body, dict):
        raise InvalidInput("The request body must be a JSON object.")
    return body


def _route(gw: Gateway, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The name to look up and the routing parameters from ``model`` (``m``, ``m:precision``
    or a variant's name)."""
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise InvalidGeneration("you must provide a model parameter", "model")
    logical, sep, precision = name.partition(":")
    known = gw.repository.models.get(logical) or gw.repository.variant(logical)
    if known is None or known.kind != LLM or (sep and logical not in gw.repository.models):
        raise ModelNotFound(_no_model(name))
    return logical, ({PRECISION_PARAMETER: precision} if sep else {})


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidGeneration(f"'{key}' must be a boolean", key)
    return value


def _sampling(body: dict[str, Any], chat: bool) -> tuple[SamplingParams, bool]:
    """The sampling parameters, and whether ``max_tokens`` was left to the server (chat)."""
    values = dict(body)
    if chat and values.get("max_completion_tokens") is not None:
        values["max_tokens"] = values["max_completion_tokens"]
    n = body.get("n")
    if n is not None and n != 1:
        raise InvalidGeneration("only n=1 is supported", "n")
    if body.get("logprobs") not in (None, False) or body.get("echo"):
        param = "logprobs" if body.get("logprobs") not in (None, False) else "echo"
        raise InvalidGeneration(f"'{param}' is not supported", param)
    fit = chat and values.get("max_tokens") is None
    try:
        return SamplingParams.from_mapping(values), fit
    except LlmRequestError as e:
        raise from_llm_error(e) from e


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise InvalidGeneration("'prompt' must be a string (one prompt per request)", "prompt")
    return prompt


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidGeneration("'messages' must be a non-empty list", "messages")
    return messages


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options") or {}
    return isinstance(options, dict) and bool(options.get("include_usage"))


# ---- completions ------------------------------------------------------------------------------
async def completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _complete(request, chat=True)


async def _complete(request: web.Request, chat: bool) -> web.StreamResponse:
    gw = _gw(request)
    body = await _body(request)  # errors before the core: counted by the app's middleware
    model, routing = _route(gw, body)
    stream = _flag(body, "stream")
    params, fit = _sampling(body, chat)
    generation = GenerationRequest(
        params,
        prompt=None if chat else _prompt(body),
        messages=_messages(body) if chat else None,
        fit_max_tokens=fit,
    )
    text = await start_generation(
        gw,
        GenerateRequest(
            model,
            generation,
            parameters=routing,
            headers={k.lower(): v for k, v in request.headers.items()},
            protocol="http",
        ),
    )
    shape = _Shape(chat, text)
    if stream:
        return await _stream(request, text, shape, _include_usage(body))
    parts = []
    async with contextlib.aclosing(text.chunks()) as chunks:
        async for chunk in chunks:
            if client_gone(request):  # nobody to answer: stop generating (closing cancels)
                raise left(ClientDisconnected("client disconnected during a completion"))
            parts.append(chunk.text)
    return web.json_response(
        shape.whole("".join(parts)), headers={PRECISION_HEADER: text.precision}
    )


class _Shape:
    """The JSON of one completion (``text_completion`` or ``chat.completion``)."""

    def __init__(self, chat: bool, text: TextStream) -> None:
        self.chat = chat
        self.text = text
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.text.variant.openai_name,
            "system_fingerprint": self.text.variant.name,
        }

    def usage(self) -> dict[str, int]:
        p, c = self.text.prompt_tokens, self.text.completion_tokens
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def whole(self, content: str) -> dict[str, Any]:
        finish = self.text.finish_reason
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": finish,
            }
            doc = self._head("chat.completion")
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish}
            doc = self._head("text_completion")
        return {**doc, "choices": [choice], "usage": self.usage()}

    def delta(self, chunk: Chunk | None, first: bool = False) -> dict[str, Any]:
        finish = chunk.finish_reason if chunk is not None else None
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if chunk is not None and chunk.text:
                delta["content"] = chunk.text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            doc = self._head("chat.completion.chunk")
        else:
            text = chunk.text if chunk is not None else ""
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            doc = self._head("text_completion")
        return {**doc, "choices": [choice]}

    def usage_chunk(self) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage()}


def client_gone(request: web.Request) -> bool:
    """The client closed its connection (a non-streamed answer has nowhere to go)."""
    transport = request.transport
    return transport is None or transport.is_closing()


def left(error: ClientDisconnected) -> ClientDisconnected:
    """``error``, marked counted: the generation path counted the request (CANCELLED)."""
    error.counted = True
    return error


def _event(doc: dict[str, Any] | str) -> bytes:
    data = doc if isinstance(doc, str) else json.dumps(doc, separators=(",", ":"))
    return b"data: " + data.encode() + b"\n\n"


async def sse_response(request: web.Request, precision: str) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            PRECISION_HEADER: precision,
        }
    )
    await response.prepare(request)
    return response


async def _stream(
    request: web.Request, text: TextStream, shape: _Shape, include_usage: bool
) -> web.StreamResponse:
    """Server-sent events: a chunk per piece of text (chat: the role first), the finish reason
    on the last, the usage when asked (``stream_options.include_usage``), then ``[DONE]``. An
    error after the first event is sent as an event with OpenAI's error body."""
    try:
        response = await sse_response(request, text.precision)
        if shape.chat:
            await response.write(_event(shape.delta(None, first=True)))
        try:
            async with contextlib.aclosing(text.chunks()) as chunks:
                async for chunk in chunks:
                    if chunk.text or chunk.finish_reason:
                        await response.write(_event(shape.delta(chunk)))
        except GatewayError as e:
            kind = _STATUS.get(e.code, (500, "server_error"))[1]
            body = error_body(client_message(e, request.path), kind, e.param, e.reason)
            await response.write(_event(body))
        if include_usage:
            await response.write(_event(shape.usage_chunk()))
        await response.write(_event("[DONE]"))
        await response.write_eof()
    except CLIENT_GONE as e:  # the generation stopped (chunks() closed): nobody to answer
        log.info("client %s left a stream of %s: %s", request.remote, text.variant.name, e)
    finally:
        await text.close()
    return response


def add_routes(app: web.Application, gateway: Gateway, body_timeout_s: float) -> None:
    app[_GATEWAY] = gateway
    app[_BODY_TIMEOUT] = body_timeout_s
    app[_STARTED] = int(time.time())
    r = app.router
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model:.+}", get_model)
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/chat/completions", chat_completions)


__all__ = ["PREFIX", "add_routes", "error_body", "error_response", "sse_response"]
