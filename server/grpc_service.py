"""Triton's ``inference.GRPCInferenceService`` on grpc.aio: a thin adapter over server.core.

Uses the generated stubs shipped in tritonclient. Gateway errors become gRPC statuses in
:func:`_status_of` (the one mapping for this transport), applied by :func:`_handled`.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from server.core import PRECISION_HEADER, Gateway, InferRequest, InferResponse, ModelView
from server.errors import GatewayError, InvalidInput, client_message
from server.restricted import grpc_group
from server.tensors import WireTensor, datatype_of, encode_raw

log = logging.getLogger(__name__)

SERVER_NAME = "precision-serve"
SERVICE = "inference.GRPCInferenceService"


def server_version() -> str:
    try:
        return importlib.metadata.version("precision-serve")
    except importlib.metadata.PackageNotFoundError:
        return "0"


EXTENSIONS = ["model_configuration", "statistics", "binary_tensor_data", "parameters"]

# KServe datatype -> InferTensorContents field for typed (non-raw) contents.
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _status_of(error: GatewayError) -> grpc.StatusCode:
    """The one GatewayError -> gRPC status mapping (the code names are gRPC's own)."""
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


def _handled(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Gateway errors -> their status; internal ones -> INTERNAL with an error id only (the log
    has the text); a rejected ModelInfer is counted in the request metric."""
    infer = method.__name__ == "ModelInfer"
    group = None if infer else grpc_group(method.__name__)  # inference: the core authorizes

    @functools.wraps(method)
    async def wrapper(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext):
        try:
            if group in self.gateway.restricted:
                self.gateway.authorize_api(group, _metadata(context))
            return await method(self, request, context)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as e:  # the server never dies on a request
            if infer:
                self.gateway.count_rejected("unknown", "grpc", e)
            status = _status_of(e) if isinstance(e, GatewayError) else grpc.StatusCode.INTERNAL
            await context.abort(status, client_message(e, method.__name__))

    return wrapper


def _param_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _wire_tensors(request: pb.ModelInferRequest) -> list[WireTensor]:
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    out = []
    for i, t in enumerate(request.inputs):
        wt = WireTensor(name=t.name, datatype=t.datatype, shape=[int(d) for d in t.shape])
        if raw:
            wt.raw = raw[i]
        else:
            field = _CONTENTS_FIELD.get(t.datatype)
            if field is None:
                raise InvalidInput(
                    f"input {t.name!r}: {t.datatype} needs raw_input_contents (no typed contents)"
                )
            wt.values = list(getattr(t.contents, field))
        out.append(wt)
    return out


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    md = context.invocation_metadata() or ()
    return {k.lower(): v if isinstance(v, str) else v.decode() for k, v in md}


def _tensor_meta(
    view: ModelView, which: str, batched: bool
) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    tensors = view.inputs if which == "inputs" else view.outputs
    return [
        pb.ModelMetadataResponse.TensorMetadata(
            name=t.name, datatype=t.datatype, shape=([-1] if batched else []) + list(t.shape)
        )
        for t in tensors
    ]


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    @_handled
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.gateway.live())

    @_handled
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.gateway.ready())

    @_handled
    async def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=self.gateway.model_ready(request.name, request.version))

    @_handled
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=server_version(), extensions=EXTENSIONS
        )

    @_handled
    async def ModelMetadata(self, request, context):
        view = self.gateway.metadata(request.name, request.version)
        batched = self.gateway.config(request.name, request.version).max_batch_size > 0
        return pb.ModelMetadataResponse(
            name=view.name,
            versions=view.versions,
            platform=view.platform,
            inputs=_tensor_meta(view, "inputs", batched),
            outputs=_tensor_meta(view, "outputs", batched),
        )

    @_handled
    async def ModelConfig(self, request, context):
        return pb.ModelConfigResponse(config=self.gateway.config(request.name, request.version))

    @_handled
    async def ModelStatistics(self, request, context):
        return pb.ModelStatisticsResponse(
            model_stats=[
                _stats(name, s)
                for name, s in self.gateway.statistics(request.name, request.version).items()
            ]
        )

    @_handled
    async def RepositoryIndex(self, request, context):
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(
                    name=name, version=version, state=state, reason=reason
                )
                for name, version, state, reason in self.gateway.index()
                if not request.ready or state == "READY"
            ]
        )

    @_handled
    async def ModelInfer(self, data: bytes, context):
        """Takes and returns serialised messages (registered without (de)serializers): with a
        pass-through upstream the request's bytes go on as they are, and so do the reply's."""
        try:
            request = pb.ModelInferRequest.FromString(data)
        except DecodeError as e:
            raise InvalidInput(f"malformed ModelInferRequest: {e}") from None
        remaining = context.time_remaining()
        params = request.parameters
        forward = self.gateway.forwards
        infer = InferRequest(
            model=request.model_name,
            version=request.model_version,
            id=request.id,
            inputs=[] if forward else _wire_tensors(request),
            outputs=[o.name for o in request.outputs] or None,
            parameters={k: _param_value(v) for k, v in params.items()} if params else {},
            headers=_metadata(context),
            deadline=None if remaining is None else time.monotonic() + remaining,
            protocol="grpc",
        )
        if forward:
            infer.payload = data
            infer.rows = _batch_rows(request)
            infer.decode_inputs = functools.partial(_wire_tensors, request)
        response = await self.gateway.infer(infer)
        await context.send_initial_metadata(((PRECISION_HEADER, response.precision),))
        if response.raw is not None:
            return response.raw + _precision_parameter(response.precision)
        return infer_response_bytes(response)


def _batch_rows(request: pb.ModelInferRequest) -> int:
    shape = request.inputs[0].shape if request.inputs else ()
    return int(shape[0]) if shape else 1


_RAW_OUTPUT_TAG = b"\x32"  # ModelInferResponse.raw_output_contents: field 6, length-delimited
_prefixes: dict[tuple[str, str, str], bytes] = {}


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _precision_parameter(precision: str) -> bytes:
    """``parameters["precision"]`` alone, serialised: appended to a reply it adds the entry
    (map fields merge on concatenation; a repeated key takes the last value)."""
    return _prefix("", "", precision)


def _prefix(model_name: str, version: str, precision: str) -> bytes:
    """model_name, model_version and the precision parameter, serialised once per variant."""
    key = (model_name, version, precision)
    head = _prefixes.get(key)
    if head is None:
        msg = pb.ModelInferResponse(model_name=model_name, model_version=version)
        msg.parameters["precision"].string_param = precision
        head = _prefixes[key] = msg.SerializeToString()
    return head


def infer_response_bytes(r: InferResponse) -> bytes:
    """A serialised ``ModelInferResponse``, built from parts (protobuf concatenation = merge):
    the output tensors' bytes are copied once, into the reply, instead of into a raw array,
    then into the message, then into its serialisation."""
    meta = pb.ModelInferResponse(id=r.id)
    parts: list[Any] = [_prefix(r.model_name, r.model_version, r.precision), b""]
    for name, arr in r.outputs.items():
        arr = np.asarray(arr)
        meta.outputs.add(name=name, datatype=datatype_of(arr), shape=arr.shape)
        data = _raw_view(arr)
        parts += (_RAW_OUTPUT_TAG, _varint(data.nbytes), data)
    parts[1] = meta.SerializeToString()
    return b"".join(parts)


def _raw_view(arr: np.ndarray) -> memoryview | bytes:
    if arr.dtype == np.object_:
        return encode_raw(arr)
    le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return memoryview(le).cast("B") if le.size else b""


def _stats(name: str, s: Any) -> pb.ModelStatistics:
    duration = pb.StatisticDuration
    return pb.ModelStatistics(
        name=name,
        version="1",
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=duration(count=s.success_count, ns=s.success_ns),
            fail=duration(count=s.fail_count, ns=s.fail_ns),
        ),
    )


class _Captured:
    """Stands in for a server to collect the generated code's method handlers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = dict(handlers)


def add_service(server: grpc.aio.Server, servicer: InferenceServicer) -> None:
    """The generated handlers, except ModelInfer, which takes and returns bytes."""
    captured = _Captured()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, captured)
    handlers = captured.handlers
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer, request_deserializer=None, response_serializer=None
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


async def start_grpc_server(
    gateway: Gateway,
    host: str,
    port: int,
    max_message_bytes: int,
    tls: tuple[bytes, bytes] | None = None,
    reuse_port: bool = False,
) -> tuple[grpc.aio.Server, int]:
    """Start the service; returns the server and the bound port (``port`` may be 0).
    ``reuse_port``: share the port with other workers (``--workers``)."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max(max_message_bytes, 64 * 1024 * 1024)),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    server = grpc.aio.server(options=options)
    add_service(server, InferenceServicer(gateway))
    address = f"{host}:{port}"
    if tls is not None:
        cert, key = tls
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    return server, bound
