"""Triton's generate extension for decoder LLM variants: ``POST /v2/models/{m}[/versions/{v}]
/generate`` (one JSON answer) and ``.../generate_stream`` (server-sent events, one ``data:``
per piece of text), over the one generation path (server/dataplane/generation.py).

The body is Triton's: a JSON object whose keys name the model's inputs (``text_input``, and the
optional ``stream``, ``sampling_parameters`` as a JSON string, ``exclude_input_in_output``),
``id``, ``parameters`` (request parameters: the sampling fields ``max_tokens``, ``temperature``,
``top_p``, ``seed``, ``stop``, and ``precision`` for routing; where ``sampling_parameters``
names a field too, it wins, as in the builder's Triton model); any other key is a request
parameter too, as Triton's generate extension passes it on. The answer holds ``model_name``
(the variant that served), ``model_version`` and the outputs by name (``text_output``,
``finish_reason``, ``num_input_tokens``, ``num_output_tokens``); the ``x-precision`` header
names the precision. Errors are Triton's ``{"error": "..."}`` (the HTTP app's middleware); in a
stream that has begun, an event ``data: {"error": "..."}`` ends it.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Any

from aiohttp import ClientConnectionResetError, web

from common.llm import LlmRequestError, SamplingParams
from server.dataplane.gateway import PRECISION_HEADER, Gateway
from server.dataplane.generation import GenerateRequest, TextStream, start_generation
from server.errors import (
    ClientDisconnected,
    GatewayError,
    InvalidGeneration,
    InvalidInput,
    client_message,
    from_llm_error,
)
from server.transports.http.limits import read_body
from server.transports.http.openai import client_gone, left
from server.upstreams.generation import GenerationRequest

log = logging.getLogger(__name__)

INPUTS = ("text_input", "stream", "sampling_parameters", "exclude_input_in_output")
_GATEWAY = web.AppKey("generate_gateway", Gateway)
_BODY_TIMEOUT = web.AppKey("generate_body_timeout", float)


def parse_generate(doc: dict[str, Any]) -> tuple[str, SamplingParams, dict[str, Any], bool]:
    """(text_input, sampling parameters, request parameters, exclude_input_in_output) of a
    generate body; sampling fields from ``parameters`` and ``sampling_parameters`` (which
    wins)."""
    text = doc.get("text_input")
    if isinstance(text, list) and len(text) == 1:
        text = text[0]
    if not isinstance(text, str):
        raise InvalidGeneration("input 'text_input' must be a string", "text_input")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    params = {**{k: v for k, v in doc.items() if k not in (*INPUTS, "id", "parameters")}, **params}
    sampling: dict[str, Any] = dict(params)
    raw = doc.get("sampling_parameters")
    try:
        if raw is not None:
            sampling.update(_json_object(raw))
        values = SamplingParams.from_mapping(sampling)
    except LlmRequestError as e:
        raise from_llm_error(e) from e
    exclude = doc.get("exclude_input_in_output", True)
    if not isinstance(exclude, bool):
        raise InvalidGeneration("input 'exclude_input_in_output' must be a boolean")
    return text, values, params, exclude


def _json_object(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, str):
        raise LlmRequestError("input 'sampling_parameters' must be a JSON string")
    try:
        values = json.loads(raw) if raw else {}
    except ValueError as e:
        raise LlmRequestError(f"input 'sampling_parameters' is not valid JSON: {e}") from None
    if not isinstance(values, dict):
        raise LlmRequestError("input 'sampling_parameters' must be a JSON object")
    return values


async def _start(request: web.Request) -> tuple[dict[str, Any], TextStream, str]:
    gw = request.app[_GATEWAY]
    timeout = request.app[_BODY_TIMEOUT]  # the size limit and --http-body-timeout
    body = await read_body(request, gw.repository, gw.max_request_bytes, timeout)
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise InvalidInput(f"request is not valid JSON: {e}") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request must be a JSON object")
    text, sampling, params, exclude = parse_generate(doc)
    stream = await start_generation(
        gw,
        GenerateRequest(
            request.match_info["model"],
            GenerationRequest(sampling, prompt=text),
            version=request.match_info.get("version", ""),
            parameters=params,
            headers={k.lower(): v for k, v in request.headers.items()},
            protocol="http",
        ),
    )
    return doc, stream, "" if exclude else text


def _answer(doc: dict[str, Any], stream: TextStream, text: str, tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {"model_name": stream.variant.name, "model_version": "1"}
    if isinstance(doc.get("id"), str):
        out["id"] = doc["id"]
    out.update(
        text_output=text,
        finish_reason=stream.finish_reason or "",
        num_input_tokens=stream.prompt_tokens,
        num_output_tokens=tokens,
    )
    return out


async def generate(request: web.Request) -> web.Response:
    doc, stream, prefix = await _start(request)
    parts = [prefix]
    try:
        async with contextlib.aclosing(stream.chunks()) as chunks:
            async for chunk in chunks:
                if client_gone(request):  # nobody to answer: stop generating
                    raise left(ClientDisconnected("client disconnected during a generation"))
                parts.append(chunk.text)
    finally:
        await stream.close()
    body = _answer(doc, stream, "".join(parts), stream.completion_tokens)
    return web.json_response(body, headers={PRECISION_HEADER: stream.precision})


async def generate_stream(request: web.Request) -> web.StreamResponse:
    doc, stream, prefix = await _start(request)
    response = web.StreamResponse(
        headers={
            "content-type": "text/event-stream",
            "cache-control": "no-cache",
            PRECISION_HEADER: stream.precision,
        }
    )
    try:
        await response.prepare(request)
        try:
            async with contextlib.aclosing(stream.chunks()) as chunks:
                async for chunk in chunks:
                    if not (chunk.text or prefix or chunk.finish_reason):
                        continue
                    event = _answer(doc, stream, prefix + chunk.text, chunk.tokens)
                    prefix = ""
                    await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        except GatewayError as e:
            error = {"error": client_message(e, request.path)}
            await response.write(b"data: " + json.dumps(error).encode() + b"\n\n")
        await response.write_eof()
    except (ConnectionError, ClientConnectionResetError) as e:
        log.info("client %s left a stream of %s: %s", request.remote, stream.variant.name, e)
    finally:
        await stream.close()
    return response


def add_routes(app: web.Application, gateway: Gateway, body_timeout_s: float) -> None:
    app[_GATEWAY] = gateway
    app[_BODY_TIMEOUT] = body_timeout_s
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_post(prefix + "/generate", generate)
        app.router.add_post(prefix + "/generate_stream", generate_stream)


__all__ = ["add_routes", "parse_generate"]
