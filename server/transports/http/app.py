"""KServe v2 REST (plus Triton's binary-tensor extension) on aiohttp: a thin adapter over core.

Gateway errors become HTTP statuses in :data:`HTTP_STATUS` / :func:`_error_middleware` (the one
mapping for this transport); bodies are ``{"error": "..."}`` as Triton sends them.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import ClientConnectionResetError, web
from google.protobuf import json_format

from common.model_repository.dtypes import from_datatype
from common.model_repository.errors import DtypeError
from server.dataplane import statistics, wording
from server.dataplane.extensions import EXTENSIONS, SERVER_NAME, server_version
from server.dataplane.gateway import (
    FALLBACK_PARAMETER,
    PRECISION_HEADER,
    SHADOW_HEADER,
    Gateway,
    InferRequest,
    InferResponse,
    ModelView,
)
from server.dataplane.model_control import ModelControl
from server.dataplane.restricted import http_access
from server.dataplane.shared_memory import (
    SystemSharedMemory,
    TensorRef,
    cuda_unsupported,
    tensor_ref,
)
from server.dataplane.tensors import WireTensor, datatype_of, encode_raw
from server.errors import (
    ClientDisconnected,
    ConfigError,
    GatewayError,
    InvalidInput,
    ModelNotFound,
    PayloadTooLarge,
    client_message,
)
from server.transports.http import generate, openai
from server.transports.http.limits import CappedSite, off_loop, read_body

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
_INT64_MAX = 2**63 - 1
DEFAULT_BODY_TIMEOUT_S = 30.0

HTTP_STATUS = {
    "NOT_FOUND": 404,
    "INVALID_ARGUMENT": 400,
    "RESOURCE_EXHAUSTED": 413,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
    "UNAUTHENTICATED": 401,
    "UNIMPLEMENTED": 501,
    "ALREADY_EXISTS": 400,  # as Triton (no closer HTTP code)
    "FAILED_PRECONDITION": 400,
    "INTERNAL": 500,
}
GATEWAY_KEY = web.AppKey("gateway", Gateway)
CONTROL_KEY = web.AppKey("model_control", ModelControl)


@dataclass(frozen=True)
class HttpLimits:
    """Per-connection limits of the HTTP listener (``--http-body-timeout``,
    ``--http-max-connections``; 0 connections: no cap)."""

    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_connections: int = 0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.body_timeout_s) and self.body_timeout_s > 0):
            raise ConfigError(f"--http-body-timeout must be > 0 s, got {self.body_timeout_s}")
        if self.max_connections < 0:
            raise ConfigError(f"--http-max-connections must be >= 0, got {self.max_connections}")


LIMITS_KEY = web.AppKey("limits", HttpLimits)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def _error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The one error -> HTTP status mapping; internal errors get an id only (the log has the
    text); a rejected inference call is counted in the request metric."""
    try:  # authorized before any handler reads the body
        _gw(request).admit(http_access(request.path), lambda: _headers(request))
        return await handler(request)
    except web.HTTPRequestEntityTooLarge as e:
        error: Exception = PayloadTooLarge(f"request body too large: {e.text}")
    except web.HTTPException as e:
        if request.path.startswith(openai.PREFIX):
            body = openai.error_body(e.reason or "error", "invalid_request_error", None, None)
            return web.json_response(body, status=e.status)
        return _error(e.status, e.reason or "error")
    except (ConnectionError, ClientConnectionResetError) as e:  # the client went away
        log.info("client %s disconnected during %s: %s", request.remote, request.path, e)
        error = ClientDisconnected(f"client disconnected: {e}")
    except Exception as e:  # the server never dies on a request
        error = e
    if request.path.endswith(("/infer", "/generate", "/generate_stream", "completions")):
        _gw(request).count_rejected(request.match_info.get("model", ""), "http", error)
    message = client_message(error, request.path)
    if request.path.startswith(openai.PREFIX):  # OpenAI's error shape on its endpoints
        return openai.error_response(error, message)
    if isinstance(error, GatewayError):
        return _error(error.http_status or HTTP_STATUS.get(error.code, 500), message)
    return _error(500, message)


def _gw(request: web.Request) -> Gateway:
    return request.app[GATEWAY_KEY]


def _control(request: web.Request) -> ModelControl:
    return request.app[CONTROL_KEY]


def _headers(request: web.Request) -> dict[str, str]:
    """The request's headers by lower-case name (what the core reads)."""
    return {k.lower(): v for k, v in request.headers.items()}


def _version(request: web.Request) -> str:
    return request.match_info.get("version", "")


# ---- health / metadata ----------------------------------------------------------------------
async def live(request: web.Request) -> web.Response:
    return web.json_response({"live": True}, status=200 if _gw(request).live() else 503)


async def ready(request: web.Request) -> web.Response:
    ok = _gw(request).ready()
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return web.json_response(
        {"name": SERVER_NAME, "version": server_version(), "extensions": list(EXTENSIONS)}
    )


def _tensors(tensors: list, batched: bool) -> list[dict[str, Any]]:
    return [
        {"name": t.name, "datatype": t.datatype, "shape": ([-1] if batched else []) + list(t.shape)}
        for t in tensors
    ]


async def model_metadata(request: web.Request) -> web.Response:
    gw, name, version = _gw(request), request.match_info["model"], _version(request)
    view: ModelView = gw.metadata(name, version)
    batched = gw.config(name, version).max_batch_size > 0
    return web.json_response(
        {
            "name": view.name,
            "versions": view.versions,
            "platform": view.platform,
            "inputs": _tensors(view.inputs, batched),
            "outputs": _tensors(view.outputs, batched),
        }
    )


async def model_ready(request: web.Request) -> web.Response:
    try:
        ok = _gw(request).model_ready(request.match_info["model"], _version(request))
    except ModelNotFound as e:  # Triton's answer for an unknown model or version: 400
        raise InvalidInput(f"{wording.MODEL_NOT_READY}: {e.message}") from None
    return web.json_response({"ready": ok}, status=200 if ok else 503)


async def model_config(request: web.Request) -> web.Response:
    cfg = _gw(request).config(request.match_info["model"], _version(request))
    return web.json_response(json_format.MessageToDict(cfg, preserving_proto_field_name=True))


async def model_stats(request: web.Request) -> web.Response:
    gw, name = _gw(request), request.match_info.get("model", "")
    entries = await gw.statistics(name, _version(request))
    stats = [statistics.to_json(n, s) for n, s in entries.items()]
    return web.json_response({"model_stats": stats})


async def _json_body(request: web.Request, what: str) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except (ValueError, RecursionError):
        raise InvalidInput(f"{what} body must be JSON") from None
    if body is None:
        return {}
    if not isinstance(body, dict):
        raise InvalidInput(f"{what} body must be a JSON object")
    return body


async def repository_index(request: web.Request) -> web.Response:
    body = await _json_body(request, "repository index")
    rows = _control(request).index(bool(body.get("ready")))
    return web.json_response(
        [{"name": n, "version": v, "state": s, "reason": r} for n, v, s, r in rows]
    )


async def repository_control(request: web.Request) -> web.Response:
    """``POST /v2/repository/models/{model}/load`` and ``.../unload``
    (server/dataplane/model_control.py)."""
    body = await _json_body(request, "model load/unload")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    control = _control(request)
    action = control.load if request.match_info["action"] == "load" else control.unload
    await action(request.match_info["model"], params)
    return web.json_response({})


# ---- inference ---------------------------------------------------------------------------------
def _parse_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidInput(
                f"{HEADER_LENGTH} must be an integer, got {header_length!r}"
            ) from None
        if not 0 <= n <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH} {n} is outside the body of {len(body)} bytes")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    try:
        doc = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"request is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidInput("request JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidInput("request must be a JSON object")
    return doc, binary


@dataclass
class InShm:
    """An input in system shared memory, as parsed: read from its region in the serving
    process (:func:`_read_shm_inputs`; a parser process has no regions)."""

    name: str
    datatype: str
    shape: list[int]
    ref: TensorRef


def _read_shm_inputs(inputs: list[WireTensor | InShm], shm: SystemSharedMemory) -> list[WireTensor]:
    return [
        shm.input_tensor(t.name, t.datatype, t.shape, t.ref) if isinstance(t, InShm) else t
        for t in inputs
    ]


def _wire_inputs(
    doc: dict[str, Any], binary: bytes, shm: SystemSharedMemory | None = None
) -> list[WireTensor | InShm]:
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):  # an empty list: the core's (Triton's) count error
        raise InvalidInput("request needs an 'inputs' list")
    offset, out = 0, []
    for i, t in enumerate(inputs):
        if not isinstance(t, dict):
            raise InvalidInput(f"inputs[{i}] must be an object")
        name, datatype, shape = t.get("name"), t.get("datatype"), t.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInput(f"inputs[{i}] needs string 'name' and 'datatype'")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InvalidInput(f"input {name!r}: 'shape' must be a list of integers")
        _check_dims(name, shape)
        params = t.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"input {name!r}: 'parameters' must be an object")
        if ref := tensor_ref("input", name, params):  # system shared memory
            out.append(
                InShm(name, datatype, shape, ref)
                if shm is None
                else shm.input_tensor(name, datatype, shape, ref)
            )
            continue
        wt = WireTensor(name=name, datatype=datatype, shape=shape)
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size!r} exceeds the "
                    f"{len(binary) - offset} binary bytes left"
                )
            wt.raw = binary[offset : offset + size]
            offset += size
        else:
            data = t.get("data")
            if data is None:
                raise InvalidInput(f"input {name!r}: no 'data' and no binary_data_size")
            wt.values = data if isinstance(data, list) else [data]
        out.append(wt)
    if offset != len(binary):
        raise InvalidInput(
            f"{len(binary) - offset} binary bytes after the last input's binary_data_size "
            f"(the inputs declare {offset} of {len(binary)})"
        )
    return out


def _check_dims(name: str, shape: list[int]) -> None:
    """Each dimension in 0..2**63-1 and the product of the non-zero ones too (a zero beside a
    huge dimension would pass an element count of 0)."""
    product = 1
    for d in shape:
        if not 0 <= d <= _INT64_MAX:
            raise InvalidInput(
                f"input {name!r}: shape {shape} has dimension {d} outside 0..2**63-1"
            )
        product *= max(d, 1)
        if product > _INT64_MAX:
            raise InvalidInput(f"input {name!r}: shape {shape} has more than 2**63-1 elements")


def _requested_outputs(doc: dict[str, Any]) -> tuple[list[str] | None, dict[str, bool]]:
    outputs = doc.get("outputs")
    if outputs is None:
        return None, {}
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a list")
    names, binary = [], {}
    for o in outputs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidInput("each requested output needs a string 'name'")
        params = o.get("parameters") or {}
        names.append(o["name"])
        binary[o["name"]] = bool(isinstance(params, dict) and params.get("binary_data"))
    return names, binary


def _shm_outputs(doc: dict[str, Any], shm: SystemSharedMemory) -> dict[str, TensorRef]:
    """Requested outputs to write into shared memory, their regions checked up front."""
    outputs = doc.get("outputs") or []
    return shm.output_refs(
        (o["name"], o["parameters"]) for o in outputs if isinstance(o.get("parameters"), dict)
    )


def _json_data(arr: np.ndarray) -> list[Any]:
    if arr.dtype == np.object_:
        return [x.decode() if isinstance(x, bytes) else str(x) for x in arr.flatten()]
    return arr.flatten().tolist()


def _render(
    r: InferResponse, binary_all: bool, binary: dict[str, bool], in_shm: Collection[str] = ()
) -> web.Response:
    doc: dict[str, Any] = {
        "model_name": r.model_name,
        "model_version": r.model_version,
        "parameters": {"precision": r.precision},
        "outputs": [],
    }
    if r.fallback_from:
        doc["parameters"][FALLBACK_PARAMETER] = r.fallback_from
    if r.id:
        doc["id"] = r.id
    chunks = []
    for name, arr in r.outputs.items():
        arr = np.asarray(arr)
        entry: dict[str, Any] = {
            "name": name,
            "datatype": datatype_of(arr),
            "shape": list(arr.shape),
        }
        if name in in_shm:  # written to shared memory: metadata only, as Triton
            pass
        elif binary_all or binary.get(name):
            raw = encode_raw(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(arr)
        doc["outputs"].append(entry)
    head = json.dumps(doc).encode()
    headers = {PRECISION_HEADER: r.precision}
    if not chunks:
        return web.Response(body=head, content_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(len(head))
    return web.Response(
        body=head + b"".join(chunks), content_type="application/octet-stream", headers=headers
    )


async def infer(request: web.Request) -> web.Response:
    gw = _gw(request)
    limits: HttpLimits = request.app[LIMITS_KEY]
    if gw.shadow_token is not None and gw.is_shadow(request.headers.get(SHADOW_HEADER)):
        return await _shadow(request, gw, limits)
    body = await read_body(request, gw.repository, gw.max_request_bytes, limits.body_timeout_s)
    doc, inputs = await off_loop(
        len(body), parse_infer_body, body, request.headers.get(HEADER_LENGTH)
    )
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    names, binary_outputs = _requested_outputs(doc)
    out_shm = _shm_outputs(doc, gw.shared_memory)
    request_id = doc.get("id", "")
    response = await gw.infer(
        InferRequest(
            model=request.match_info["model"],
            version=_version(request),
            id=request_id if isinstance(request_id, str) else str(request_id),
            inputs=_read_shm_inputs(inputs, gw.shared_memory),
            outputs=names,
            parameters=params,
            headers=_headers(request),
            protocol="http",
        )
    )
    gw.shared_memory.write_outputs(response.outputs, out_shm)
    return _render(response, bool(params.get("binary_data_output")), binary_outputs, out_shm)


async def _shadow(request: web.Request, gw: Gateway, limits: HttpLimits) -> web.Response:
    """A sample the Envoy front mirrored here (its x-ps-shadow mark): handed to the core's
    shadow comparison (Gateway.shadow_sample), never counted as a request; an empty reply
    (Envoy drops it)."""

    async def parse() -> InferRequest:
        body = await read_body(request, gw.repository, gw.max_request_bytes, limits.body_timeout_s)
        doc, inputs = await off_loop(
            len(body), parse_infer_body, body, request.headers.get(HEADER_LENGTH)
        )
        params = doc.get("parameters") or {}
        return InferRequest(
            model=request.match_info["model"],
            version=_version(request),
            # shared-memory requests are never mirrored (select.lua leaves them to Python)
            inputs=[t for t in inputs if not isinstance(t, InShm)],
            parameters=params if isinstance(params, dict) else {},
            headers=_headers(request),
            protocol="http",
        )

    await gw.shadow_sample(request.match_info["model"], parse)
    return web.json_response({})


# ---- system shared memory (server/dataplane/shared_memory.py); CUDA shared memory: 501
# -------------------
def _region(request: web.Request) -> str:
    return request.match_info.get("region", "")


async def shm_register(request: web.Request) -> web.Response:
    gw = _gw(request)
    try:
        body = await request.json()
    except ValueError:
        raise InvalidInput("shared memory register body must be JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("key"), str):
        raise InvalidInput("shared memory register body needs 'key', 'offset' and 'byte_size'")
    gw.shared_memory.register(
        _region(request), body["key"], body.get("offset", 0), body.get("byte_size")
    )
    return web.json_response({})


async def shm_unregister(request: web.Request) -> web.Response:
    gw = _gw(request)
    gw.shared_memory.unregister(_region(request))
    return web.json_response({})


async def shm_status(request: web.Request) -> web.Response:
    gw = _gw(request)
    return web.json_response(
        [
            {"name": r.name, "key": r.key, "offset": r.offset, "byte_size": r.byte_size}
            for r in gw.shared_memory.status(_region(request))
        ]
    )


async def cuda_shm(request: web.Request) -> web.Response:
    if request.method == "POST" and request.path.endswith("/unregister"):
        return web.json_response({})  # none registered: done (perf_analyzer's clean-up)
    raise cuda_unsupported(request.path)


def parse_infer_body(
    body: bytes, header_length: str | None
) -> tuple[dict[str, Any], list[WireTensor | InShm]]:
    """The request document (without its inputs) and the input tensors, with JSON ``data`` as numpy
    arrays: what the parser process returns for a large body (server/transports/http/limits.py)."""
    doc, binary = _parse_body(body, header_length)
    inputs = _as_arrays(_wire_inputs(doc, binary))
    doc.pop("inputs", None)
    return doc, inputs


def _as_arrays(inputs: list[WireTensor | InShm]) -> list[WireTensor | InShm]:
    """JSON ``data`` lists as numpy arrays of their datatype (on the parsing thread); a list
    numpy cannot take is left for the core, whose error names the input."""
    for t in inputs:
        if isinstance(t, InShm) or t.values is None or t.datatype == "BYTES":
            continue
        try:
            dtype = from_datatype(t.datatype)
            with np.errstate(over="ignore", invalid="ignore"):
                t.values = np.asarray(t.values, dtype=dtype)
        except (DtypeError, ValueError, TypeError, OverflowError, RecursionError):
            pass
    return inputs


def make_app(
    gateway: Gateway, control: ModelControl | None = None, limits: HttpLimits | None = None
) -> web.Application:
    # The body limit is enforced in ``infer`` (a clean 413); aiohttp's own cap sits just above.
    app = web.Application(
        middlewares=[_error_middleware], client_max_size=gateway.max_request_bytes + 1024 * 1024
    )
    app[GATEWAY_KEY] = gateway
    app[CONTROL_KEY] = control or ModelControl(gateway)
    app[LIMITS_KEY] = limits or HttpLimits()
    r = app.router
    r.add_get("/v2/health/live", live)
    r.add_get("/v2/health/ready", ready)
    r.add_get("/v2", server_metadata)
    r.add_get("/v2/models/stats", model_stats)
    r.add_post("/v2/repository/index", repository_index)
    r.add_post("/v2/repository/models/{model}/{action:load|unload}", repository_control)
    for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        r.add_get(prefix, model_metadata)
        r.add_get(prefix + "/ready", model_ready)
        r.add_get(prefix + "/config", model_config)
        r.add_get(prefix + "/stats", model_stats)
        r.add_post(prefix + "/infer", infer)
    shm = "/v2/systemsharedmemory"
    r.add_get(shm + "/status", shm_status)
    r.add_get(shm + "/region/{region}/status", shm_status)
    r.add_post(shm + "/region/{region}/register", shm_register)
    r.add_post(shm + "/unregister", shm_unregister)
    r.add_post(shm + "/region/{region}/unregister", shm_unregister)
    r.add_route("*", "/v2/cudasharedmemory/{tail:.*}", cuda_shm)
    timeout = app[LIMITS_KEY].body_timeout_s
    generate.add_routes(app, gateway, timeout)  # Triton's generate extension (LLM variants)
    openai.add_routes(app, gateway, timeout)  # the OpenAI-compatible API (LLM variants)
    return app


async def start_http_server(
    gateway: Gateway,
    control: ModelControl,
    host: str,
    port: int,
    ssl_context: ssl.SSLContext | None = None,
    grace_s: float = 10.0,
    reuse_port: bool = False,
    limits: HttpLimits | None = None,
) -> tuple[web.AppRunner, int]:
    limits = limits or HttpLimits()
    runner = web.AppRunner(
        make_app(gateway, control, limits),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=grace_s,
        # a kept-alive connection is closed after this long without a complete request, also
        # while a later request's headers trickle in (CappedSite times the first request's)
        keepalive_timeout=limits.body_timeout_s,
    )
    await runner.setup()
    site = CappedSite(
        runner,
        host,
        port,
        ssl_context=ssl_context,
        reuse_port=reuse_port or None,
        max_connections=limits.max_connections,
        header_timeout_s=limits.body_timeout_s,
    )
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, bound
