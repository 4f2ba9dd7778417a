"""Triton's ``inference.GRPCInferenceService`` on grpc.aio: a thin adapter over
server.dataplane.gateway.

Uses the generated stubs shipped in tritonclient. Gateway errors become gRPC statuses in
:func:`_status_of` (the one mapping for this transport), applied by :func:`_handled`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError
from grpc._cython import cygrpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from common import heap
from server.dataplane import statistics
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
from server.dataplane.restricted import grpc_access
from server.dataplane.shared_memory import (
    REGION,
    SystemSharedMemory,
    TensorRef,
    cuda_unsupported,
    tensor_ref,
)
from server.dataplane.tensors import WireTensor, datatype_of, encode_raw
from server.errors import GatewayError, InvalidInput, ModelNotFound, Unsupported, client_message
from server.transports.grpc import decoupled
from server.transports.grpc.contents import check_sizes, read_varint_at, varint, wire_tensors
from server.transports.grpc.fast_lane import FastLane
from server.transports.grpc.streaming import error_response, stream_handler

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"


# gRPC calls handled at once (``--grpc-max-concurrent-rpcs``); with 64 MiB payloads this bounds
# what requests in flight can hold to a few GiB.
DEFAULT_MAX_CONCURRENT_RPCS = 128
ENVELOPE_BYTES = 1024 * 1024  # room for a request's metadata beside its tensor payload


def _status_of(error: GatewayError) -> grpc.StatusCode:
    """The one GatewayError -> gRPC status mapping (the code names are gRPC's own)."""
    return getattr(grpc.StatusCode, error.code, grpc.StatusCode.INTERNAL)


# What grpc.aio raises when a call's status can no longer be sent (the call ended in the core)
_CALL_ENDED: type[BaseException] = getattr(cygrpc, "ExecuteBatchError", RuntimeError)


def _handled(method: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """Gateway errors -> their status; internal ones -> INTERNAL with an error id only (the log
    has the text); a rejected ModelInfer is counted in the request metric."""
    infer = method.__name__ == "ModelInfer"
    access = grpc_access(method.__name__)

    @functools.wraps(method)
    async def wrapper(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext):
        try:  # authorized before the request is parsed (ModelInfer's is still bytes)
            self.gateway.admit(access, lambda: _metadata(context))
            return await method(self, request, context)
        except (grpc.aio.AbortError, grpc.RpcError):
            raise
        except Exception as e:  # the server never dies on a request
            if infer:
                self.gateway.count_rejected("unknown", "grpc", e)
            status = _status_of(e) if isinstance(e, GatewayError) else grpc.StatusCode.INTERNAL
            try:
                await context.abort(status, client_message(e, method.__name__))
            except _CALL_ENDED:  # the client is gone (deadline passed, cancelled): no one to
                raise asyncio.CancelledError from None  # tell; grpc logs a traceback otherwise

    return wrapper


def _param_value(p: pb.InferParameter) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


def _shm_inputs(
    request: pb.ModelInferRequest, shm: SystemSharedMemory | None
) -> dict[int, WireTensor]:
    """Inputs in system shared memory, by position (server/dataplane/shared_memory.py)."""
    found = {}
    for i, t in enumerate(request.inputs):
        if t.parameters and (ref := tensor_ref("input", t.name, _params(t.parameters))):
            if shm is None:
                raise Unsupported(f"input {t.name!r}: shared memory is not available here")
            found[i] = shm.input_tensor(t.name, t.datatype, [int(d) for d in t.shape], ref)
    return found


def _wire_tensors(
    request: pb.ModelInferRequest, shm: SystemSharedMemory | None = None
) -> list[WireTensor]:
    """The request's inputs (server/transports/grpc/contents.py), those in shared memory read from
    it."""
    return wire_tensors(request, _shm_inputs(request, shm))


def _params(params: Any) -> dict[str, Any]:
    return {k: _param_value(v) for k, v in params.items()}


def _uses_shm(request: pb.ModelInferRequest, out_shm: Collection[str]) -> bool:
    return bool(out_shm) or any(REGION in t.parameters for t in request.inputs)


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    """Invocation metadata by lower-case key (``-bin`` values that are not UTF-8 left out)."""
    return _read_metadata(context)[0]


def _deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a ``time.monotonic()`` instant (None: the client set none)."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _read_metadata(context: grpc.aio.ServicerContext) -> tuple[dict[str, str], list[str]]:
    """Invocation metadata by lower-case key, and the keys of ``-bin`` values that are not
    UTF-8 (the caller authenticates before it reports them)."""
    headers: dict[str, str] = {}
    bad: list[str] = []
    for k, v in context.invocation_metadata() or ():
        key = k.lower()
        if isinstance(v, str):
            headers[key] = v
            continue
        try:
            headers[key] = v.decode()
        except UnicodeDecodeError:
            bad.append(key)
    return headers, bad


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
    def __init__(self, gateway: Gateway, control: ModelControl) -> None:
        self.gateway = gateway
        self.control = control
        # the plain request's short way (embedded and other decoding upstreams; a pass-through
        # upstream forwards the bytes instead)
        self._lane = None if gateway.forwards else FastLane(gateway)

    @_handled
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=self.gateway.live())

    @_handled
    async def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=self.gateway.ready())

    @_handled
    async def ModelReady(self, request, context):
        try:
            ready = self.gateway.model_ready(request.name, request.version)
        except ModelNotFound:  # as Triton: an unknown model or version is not ready, no error
            ready = False
        return pb.ModelReadyResponse(ready=ready)

    @_handled
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=server_version(), extensions=list(EXTENSIONS)
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
        entries = await self.gateway.statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(
            model_stats=[statistics.to_proto(name, s) for name, s in entries.items()]
        )

    @_handled
    async def RepositoryIndex(self, request, context):
        rows = self.control.index(request.ready)
        return pb.RepositoryIndexResponse(
            models=[
                pb.RepositoryIndexResponse.ModelIndex(name=n, version=v, state=s, reason=r)
                for n, v, s, r in rows
            ]
        )

    @_handled
    async def RepositoryModelLoad(self, request, context):
        params = {k: _param_value(v) for k, v in request.parameters.items()}
        await self.control.load(request.model_name, params)
        return pb.RepositoryModelLoadResponse()

    @_handled
    async def RepositoryModelUnload(self, request, context):
        params = {k: _param_value(v) for k, v in request.parameters.items()}
        await self.control.unload(request.model_name, params)
        return pb.RepositoryModelUnloadResponse()

    @_handled
    async def ModelInfer(self, data: bytes, context):
        """Takes and returns serialised messages (registered without (de)serializers): with a
        pass-through upstream the request's bytes go on as they are, and so do the reply's.
        The token is checked (by :func:`_handled`) before the payload is parsed (registered
        through :func:`_releasing`)."""
        if self.gateway.shadow_token is not None and await self._shadow(data, context):
            return b""  # an empty ModelInferResponse: Envoy drops a mirror's reply
        shm = self.gateway.shared_memory
        # refused before the core saw it: counted by _handled (Gateway.count_rejected)
        headers, request = self._parse(data, context)
        infer, out_shm = self._infer_request(data, request, headers, context, shm)
        response = await self.gateway.infer(infer)
        shm.write_outputs(response.outputs, out_shm)
        # trailing, not initial, metadata: sent in the reply's one batch (a separate
        # send_initial_metadata costs a second batch: -15 % req/s for a bare echo, docs/gateway.md)
        context.set_trailing_metadata(((PRECISION_HEADER, response.precision),))
        if response.raw is not None:
            return response.raw + _precision_parameter(response.precision, response.fallback_from)
        return infer_response_bytes(response, in_shm=out_shm)

    async def _shadow(self, data: bytes, context: grpc.aio.ServicerContext) -> bool:
        """A sample the Envoy front mirrored here (its x-ps-shadow mark): handed to the core's
        shadow comparison (Gateway.shadow_sample), never counted as a request; False for
        any other call."""
        headers = _metadata(context)
        if not self.gateway.is_shadow(headers.get(SHADOW_HEADER)):
            return False

        async def parse() -> InferRequest:
            _, request = self._parse(data, context)
            params = request.parameters
            return InferRequest(
                model=request.model_name,
                version=request.model_version,
                id=request.id,
                inputs=_wire_tensors(request),
                parameters={k: _param_value(v) for k, v in params.items()} if params else {},
                headers=headers,
                protocol="grpc",
            )

        await self.gateway.shadow_sample(_model_name(data), parse)
        return True

    def decoupled_stream(self, data: bytes, context: Any) -> AsyncIterator[bytes] | None:
        """The responses of a ModelStreamInfer request to a decoupled model (an LLM,
        server/transports/grpc/decoupled.py); None for any other request."""
        name = _model_name(data)
        if name is None or not decoupled.is_decoupled(self.gateway, name):
            return None
        return self._decoupled(data, context)

    async def _decoupled(self, data: bytes, context: Any) -> AsyncIterator[bytes]:
        try:
            self.gateway.admit(grpc_access("ModelStreamInfer"), lambda: _metadata(context))
            request = pb.ModelInferRequest.FromString(data)
        except (GatewayError, DecodeError) as e:
            if isinstance(e, GatewayError):
                self.gateway.count_rejected("unknown", "grpc", e)
            message = client_message(e) if isinstance(e, GatewayError) else str(e)
            yield error_response(data, message)
            return
        async for response in decoupled.responses(
            self.gateway, request, lambda: _metadata(context)
        ):
            yield response

    def _parse(
        self, data: bytes, context: grpc.aio.ServicerContext
    ) -> tuple[dict[str, str], pb.ModelInferRequest]:
        """Parse (the call is authorized): the headers and the request."""
        headers, bad_metadata = _read_metadata(context)
        if bad_metadata:
            raise InvalidInput(f"metadata {bad_metadata[0]!r}: binary value is not UTF-8")
        # a large request whose contents do not match its declared shapes is refused here,
        # before parsing - also on the pass-through path (where Triton words the errors of
        # requests under the scan's threshold): parsing 60 MB stalls the event loop
        check_sizes(data)
        try:
            return headers, pb.ModelInferRequest.FromString(data)
        except DecodeError as e:
            raise InvalidInput(f"malformed ModelInferRequest: {e}") from None

    def _infer_request(
        self,
        data: bytes,
        request: pb.ModelInferRequest,
        headers: dict[str, str],
        context: grpc.aio.ServicerContext,
        shm: SystemSharedMemory,
    ) -> tuple[InferRequest, dict[str, TensorRef]]:
        """The parsed request for the core, its own tensors checked: the plain request decoded
        by the fast lane, a pass-through one as its bytes, any other as wire tensors."""
        deadline = _deadline_of(context)
        plain = None if self._lane is None else self._lane.arrays(request)
        if plain is not None:  # fast_lane.py: checked against the variant it names already
            infer = InferRequest(
                model=request.model_name,
                inputs=[],
                id=request.id,
                headers=headers,
                deadline=deadline,
                protocol="grpc",
                arrays=plain,
            )
            return infer, {}
        out_shm = _shm_outputs(request, shm)
        # shared memory is this host's: such requests are decoded here, never passed through
        forward = self.gateway.forwards and not _uses_shm(request, out_shm)
        params = request.parameters
        infer = InferRequest(
            model=request.model_name,
            version=request.model_version,
            id=request.id,
            inputs=[] if forward else _wire_tensors(request, shm),
            outputs=[o.name for o in request.outputs] or None,
            parameters={k: _param_value(v) for k, v in params.items()} if params else {},
            headers=headers,
            deadline=deadline,
            protocol="grpc",
        )
        if forward:
            infer.payload = data
            infer.rows = _batch_rows(request)
            infer.decode_inputs = functools.partial(_wire_tensors, request, shm)
        return infer, out_shm

    # ---- system shared memory (server/dataplane/shared_memory.py); CUDA shared memory:
    # UNIMPLEMENTED ----
    @_handled
    async def SystemSharedMemoryRegister(self, request, context):
        self.gateway.shared_memory.register(
            request.name, request.key, request.offset, request.byte_size
        )
        return pb.SystemSharedMemoryRegisterResponse()

    @_handled
    async def SystemSharedMemoryUnregister(self, request, context):
        self.gateway.shared_memory.unregister(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @_handled
    async def SystemSharedMemoryStatus(self, request, context):
        status = pb.SystemSharedMemoryStatusResponse.RegionStatus
        return pb.SystemSharedMemoryStatusResponse(
            regions={
                r.name: status(name=r.name, key=r.key, offset=r.offset, byte_size=r.byte_size)
                for r in self.gateway.shared_memory.status(request.name)
            }
        )

    @_handled
    async def CudaSharedMemoryRegister(self, request, context):
        raise cuda_unsupported("CudaSharedMemoryRegister")

    @_handled
    async def CudaSharedMemoryUnregister(self, request, context):
        """Nothing to unregister, so done (perf_analyzer's clean-up after any shm run calls it)."""
        return pb.CudaSharedMemoryUnregisterResponse()

    @_handled
    async def CudaSharedMemoryStatus(self, request, context):
        raise cuda_unsupported("CudaSharedMemoryStatus")


def _shm_outputs(request: pb.ModelInferRequest, shm: SystemSharedMemory) -> dict[str, TensorRef]:
    """Requested outputs to write into shared memory, their regions checked up front."""
    if not any(o.parameters for o in request.outputs):
        return {}
    return shm.output_refs((o.name, _params(o.parameters)) for o in request.outputs)


def _model_name(data: bytes) -> str | None:
    """A serialised ModelInferRequest's ``model_name`` (field 1, serialised first), read without
    parsing the message; None when it is not there or not text."""
    if not data or data[0] != 0x0A:
        return None
    try:
        size, pos = read_varint_at(data, 1)
        return bytes(data[pos : pos + size]).decode()
    except (InvalidInput, UnicodeDecodeError):
        return None


def _batch_rows(request: pb.ModelInferRequest) -> int:
    shape = request.inputs[0].shape if request.inputs else ()
    return int(shape[0]) if shape else 1


_RAW_OUTPUT_TAG = b"\x32"  # ModelInferResponse.raw_output_contents: field 6, length-delimited
_prefixes: dict[tuple[str, str, str, str], bytes] = {}


def _precision_parameter(precision: str, fallback_from: str = "") -> bytes:
    """``parameters["precision"]`` (and ``fallback_from``) alone, serialised: appended to a
    reply it adds the entries (map fields merge on concatenation; a repeated key takes the last
    value)."""
    return _prefix("", "", precision, fallback_from)


def _prefix(model_name: str, version: str, precision: str, fallback_from: str = "") -> bytes:
    """model_name, model_version and the precision parameter (plus ``fallback_from`` when the
    routed precision was not the one that served), serialised once per combination."""
    key = (model_name, version, precision, fallback_from)
    head = _prefixes.get(key)
    if head is None:
        msg = pb.ModelInferResponse(model_name=model_name, model_version=version)
        msg.parameters["precision"].string_param = precision
        if fallback_from:
            msg.parameters[FALLBACK_PARAMETER].string_param = fallback_from
        head = _prefixes[key] = msg.SerializeToString()
    return head


def infer_response_bytes(r: InferResponse, in_shm: Collection[str] = ()) -> bytes:
    """A serialised ``ModelInferResponse``, built from parts (protobuf concatenation = merge):
    the output tensors' bytes are copied once, into the reply, instead of into a raw array,
    then into the message, then into its serialisation. Outputs ``in_shm`` (written to shared
    memory) get metadata and an empty raw entry, as Triton sends them."""
    meta = pb.ModelInferResponse(id=r.id)
    parts: list[Any] = [_prefix(r.model_name, r.model_version, r.precision, r.fallback_from), b""]
    for name, arr in r.outputs.items():
        arr = np.asarray(arr)
        meta.outputs.add(name=name, datatype=datatype_of(arr), shape=arr.shape)
        data = memoryview(b"") if name in in_shm else _raw_view(arr)
        parts += (_RAW_OUTPUT_TAG, varint(data.nbytes), data)
    parts[1] = meta.SerializeToString()
    return b"".join(parts)


def _raw_view(arr: np.ndarray) -> memoryview | bytes:
    if arr.dtype == np.object_:
        return encode_raw(arr)
    le = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return memoryview(le).cast("B") if le.size else b""


def _clear_frames(error: BaseException) -> None:
    """Clear the locals of every finished frame in ``error``'s tracebacks (and its causes')."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        todo += (e.__context__, e.__cause__)


def _releasing(
    method: Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]],
) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
    """A handler taking a large payload: when an error (an abort included) leaves it, the frames
    its traceback holds - ``_handled``'s, whose argument is the payload, among them - are
    cleared. Otherwise a reference cycle through the exception keeps a rejected 60 MB request
    alive until the cyclic garbage collector happens to run (measured: +80 MB per request).
    A request of ``heap.TRIM_AFTER_BYTES`` or more then returns the heap's free pages to the
    system (:mod:`common.heap`) before it is answered."""

    @functools.wraps(method)
    async def handler(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        large = len(data) >= heap.TRIM_AFTER_BYTES
        try:
            return await method(data, context)
        except BaseException as e:
            _clear_frames(e)
            del data
            raise
        finally:
            if large:
                # the buffers gRPC received it into are free by now, but their pages stay
                # resident in malloc's arenas (common/heap.py): returned before the reply goes
                await asyncio.to_thread(heap.trim)

    return handler


class _Captured:
    """Stands in for a server to collect the generated code's method handlers."""

    handlers: dict[str, grpc.RpcMethodHandler]

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.handlers = dict(handlers)


def add_service(server: grpc.aio.Server, servicer: InferenceServicer) -> None:
    """The generated handlers, except ModelInfer and ModelStreamInfer
    (server/transports/grpc/streaming.py), which take and return bytes."""
    captured = _Captured()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, captured)
    handlers = captured.handlers
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        _releasing(servicer.ModelInfer), request_deserializer=None, response_serializer=None
    )
    handlers["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(
        stream_handler(servicer.ModelInfer, servicer.decoupled_stream),
        request_deserializer=None,
        response_serializer=None,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


async def start_grpc_server(
    gateway: Gateway,
    control: ModelControl,
    host: str,
    port: int,
    max_message_bytes: int,
    tls: tuple[bytes, bytes] | None = None,
    reuse_port: bool = False,
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
) -> tuple[grpc.aio.Server, int]:
    """Start the service; returns the server and the bound port (``port`` may be 0).
    ``reuse_port``: share the port with other workers (``--workers``). ``max_message_bytes``
    is the request payload limit: gRPC takes messages up to it plus the envelope (names, shapes,
    parameters), so a payload at the limit is refused by the gateway's own size check, by name.
    ``max_concurrent_rpcs``: calls beyond it are answered RESOURCE_EXHAUSTED by gRPC before
    their messages are read (0 = no limit)."""
    options = [
        ("grpc.max_receive_message_length", max_message_bytes + ENVELOPE_BYTES),
        ("grpc.max_send_message_length", max(max_message_bytes, 64 * 1024 * 1024)),
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_rpcs or None)
    add_service(server, InferenceServicer(gateway, control))
    address = f"{host}:{port}"
    if tls is not None:
        cert, key = tls
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    return server, bound
