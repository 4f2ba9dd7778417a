"""``ModelStreamInfer`` requests to decoupled models (the LLM variants): many responses for one
request, as Triton's stream handler sends those of a decoupled model.

The request carries the model's inputs (``text_input`` BYTES [1]; optional ``stream`` BOOL [1],
``sampling_parameters`` BYTES [1] as JSON, ``exclude_input_in_output`` BOOL [1]) and may carry
the sampling fields (``max_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``) and
``precision`` as request parameters. It takes the one generation path
(server/dataplane/generation.py). Responses:

- ``stream`` true: one response per piece of text (``text_output`` the new text,
  ``finish_reason`` "" until the last, ``num_input_tokens``, ``num_output_tokens`` of that
  response); ``stream`` false or absent: one response with the whole text;
- every response has the parameters ``precision`` and ``triton_final_response``: true on the
  last one (the one with the finish reason), as Triton flags the responses of the builder's
  python-backend model (common/llm/triton_model.py sends the final flag with the last text);
  ``model_name`` is the variant that served;
- a generation that ends without text to send (the client's stream was cancelled) ends with an
  empty response flagged final, sent only when the request set
  ``triton_enable_empty_final_response`` (tritonclient's
  ``async_stream_infer(..., enable_empty_final_response=True)``), as Triton does;
- an error (before or during the generation) is Triton's in-stream error: ``error_message`` and
  the request's ``id``; the stream goes on.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from common.llm import LlmRequestError, SamplingParams
from server.catalog import LLM
from server.dataplane.gateway import PRECISION_PARAMETER, Gateway
from server.dataplane.generation import (
    FINISH_CANCELLED,
    GenerateRequest,
    TextStream,
    start_generation,
)
from server.dataplane.tensors import decode
from server.errors import GatewayError, InvalidGeneration, client_message, from_llm_error
from server.transports.grpc.contents import wire_tensors
from server.upstreams.generation import GenerationRequest

FINAL = "triton_final_response"
EMPTY_FINAL = "triton_enable_empty_final_response"


def _param(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _scalar(arrays: Mapping[str, np.ndarray], name: str, default: Any) -> Any:
    arr = arrays.get(name)
    if arr is None:
        return default
    if arr.size != 1:
        raise InvalidGeneration(f"input '{name}' must hold one element, got {arr.size}", name)
    value = arr.reshape(-1)[0]
    return value.decode() if isinstance(value, bytes) else value


def generation_of(
    request: pb.ModelInferRequest,
) -> tuple[GenerationRequest, dict[str, Any], bool, str]:
    """(the generation, request parameters, stream?, prefix of the output (the prompt when
    ``exclude_input_in_output`` is false)) of a request to a decoupled LLM."""
    try:
        arrays = {t.name: decode(t, request.model_name, request.id) for t in wire_tensors(request)}
        text = _scalar(arrays, "text_input", None)
        if not isinstance(text, str):
            raise InvalidGeneration("input 'text_input' (BYTES [1]) is required", "text_input")
        params = {k: _param(v) for k, v in request.parameters.items()}
        sampling: dict[str, Any] = dict(params)
        raw = _scalar(arrays, "sampling_parameters", "")
        if raw:  # the tensor wins where both name a field (as common/llm/triton_model.py)
            sampling.update(json.loads(raw) if isinstance(raw, str) else {})
        if isinstance(sampling.get("stop"), str) and sampling["stop"].startswith("["):
            sampling["stop"] = json.loads(sampling["stop"])  # a list as a string parameter
        values = SamplingParams.from_mapping(sampling)
    except LlmRequestError as e:
        raise from_llm_error(e) from e
    except ValueError as e:
        raise InvalidGeneration(f"input 'sampling_parameters' is not valid JSON: {e}") from None
    stream = bool(_scalar(arrays, "stream", False))
    exclude = bool(_scalar(arrays, "exclude_input_in_output", True))
    return GenerationRequest(values, prompt=text), params, stream, "" if exclude else text


def _response(
    request: pb.ModelInferRequest, text: TextStream, final: bool, output: tuple[str, int] | None
) -> bytes:
    r = pb.ModelInferResponse(model_name=text.variant.name, model_version="1", id=request.id)
    r.parameters[PRECISION_PARAMETER].string_param = text.precision
    r.parameters[FINAL].bool_param = final
    if output is not None:
        content, tokens = output
        finish = (text.finish_reason or "") if final else ""
        for name, datatype, raw in (
            ("text_output", "BYTES", _bytes(content)),
            ("finish_reason", "BYTES", _bytes(finish)),
            ("num_input_tokens", "UINT32", np.uint32(text.prompt_tokens).tobytes()),
            ("num_output_tokens", "UINT32", np.uint32(tokens).tobytes()),
        ):
            r.outputs.add(name=name, datatype=datatype, shape=[1])
            r.raw_output_contents.append(raw)
    return pb.ModelStreamInferResponse(infer_response=r).SerializeToString()


def _bytes(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(4, "little") + data


def _error(request: pb.ModelInferRequest, message: str) -> bytes:
    response = pb.ModelStreamInferResponse(error_message=message)
    response.infer_response.id = request.id
    return response.SerializeToString()


async def responses(
    gateway: Gateway,
    request: pb.ModelInferRequest,
    headers: Callable[[], dict[str, str]],
) -> AsyncIterator[bytes]:
    """The serialised ModelStreamInferResponses of one request (module docstring)."""
    text: TextStream | None = None
    empty_final = (
        bool(request.parameters[EMPTY_FINAL].bool_param)
        if (EMPTY_FINAL in request.parameters)
        else False
    )
    try:
        generation, params, stream, prefix = generation_of(request)
        text = await start_generation(
            gateway,
            GenerateRequest(
                request.model_name,
                generation,
                version=request.model_version,
                parameters=params,
                headers=headers(),
                protocol="grpc",
            ),
        )
        parts = [prefix]
        async with contextlib.aclosing(text.chunks()) as chunks:
            async for chunk in chunks:
                last = chunk.finish_reason is not None
                if not stream:
                    parts.append(chunk.text)
                elif (chunk.text or prefix or last) and chunk.finish_reason != FINISH_CANCELLED:
                    output = (prefix + chunk.text, chunk.tokens)
                    yield _response(request, text, last, output)
                    prefix = ""
        if text.finish_reason == FINISH_CANCELLED:
            if empty_final:
                yield _response(request, text, True, None)
        elif not stream:
            output = ("".join(parts), text.completion_tokens)
            yield _response(request, text, True, output)
    except GatewayError as e:
        yield _error(request, client_message(e, "ModelStreamInfer"))
    finally:
        if text is not None:
            await text.close()


def is_decoupled(gateway: Gateway, name: str) -> bool:
    target = gateway.repository.models.get(name) or gateway.repository.variant(name)
    return target is not None and target.kind == LLM


__all__ = ["EMPTY_FINAL", "FINAL", "generation_of", "is_decoupled", "responses"]
