"""Merging forwarded ModelInfer calls: concurrent requests for one variant, one Triton call.

A forwarded request (the pass-through of server/upstreams/triton/upstream.py) costs the gateway a
whole second gRPC call - the client leg measures 0.5-0.9 ms of CPU per unary call on the 2-core
bench host, more than the server leg the gateway exists for (docs/gateway.md). When many requests
for one variant are in flight, they are merged into one call: the requests wait while ``limit``
calls for that variant are already in flight, and each time one ends the waiting ones go as one
request - their inputs concatenated along the batch dimension - whose reply is cut back into one
reply per request. A request that finds fewer than ``limit`` calls in flight goes at once, alone, as
its own bytes (so one client, or light load, sees exactly the plain pass-through). With ``wait_s`` >
0 (``--triton-merge-wait``), once a call ends the requests waiting for it wait that much longer for
others to join them - the replies just sent bring their clients' next requests - unless they already
fill the variant's ``max_batch_size``: a latency for rows-per-call trade like Triton's own
``max_queue_delay_microseconds``, off by default (docs/triton.md, "Merging"; uvloop, the default
loop, rounds timers to whole milliseconds, so 0.5 ms there is no wait at all).

Only what Triton would batch itself is merged: the variant's ``config.pbtxt`` has
``max_batch_size > 0`` and ``dynamic_batching``, and no ``sequence_batching`` or decoupled
transaction policy; within a variant, requests merge when they have the same version, inputs
(names, datatypes, shapes after the batch dimension), requested outputs, no parameters other
than the gateway's own ``precision`` and ``x-request-key`` (request, input or output: sequence
ids, priorities, timeouts, classification, shared memory, a backend's own) and inputs
only as ``raw_input_contents`` of exactly their shapes' sizes (no BYTES). Anything else is sent
alone, unchanged, and Triton answers it as it would.

Errors stay each request's own: when a merged call fails for any reason other than the variant
being unavailable (:class:`UpstreamUnavailable`: every member falls back, as each would), or its
reply cannot be cut (an output without the batch dimension, BYTES, typed contents), every
member is sent again alone, so Triton's own answer - an INVALID_ARGUMENT naming one client's
input, say - reaches only the client it is about. A merged call's deadline is its members'
earliest; a member whose deadline has passed by the re-send gets DEADLINE_EXCEEDED.

Each upstream call observes ``precision_serve_upstream_call_requests`` with the number of
requests it carried (1 for a request sent alone), so the merging shows in the gateway's metrics.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from server import metrics
from server.catalog import Variant
from server.errors import GatewayError
from server.upstreams.base import UpstreamUnavailable

log = logging.getLogger(__name__)

# KServe-v2 datatypes' bytes per element on the wire (BYTES is length-prefixed: never merged).
# Not from_datatype(...).itemsize: tritonclient maps BF16 to float32, 4 bytes, where raw BF16 is 2.
_ITEM_SIZE = {
    "BOOL": 1,
    "INT8": 1,
    "UINT8": 1,
    "INT16": 2,
    "UINT16": 2,
    "FP16": 2,
    "BF16": 2,
    "INT32": 4,
    "UINT32": 4,
    "FP32": 4,
    "INT64": 8,
    "UINT64": 8,
    "FP64": 8,
}

# request parameters only the gateway reads (server/dataplane/gateway.py's PRECISION_PARAMETER,
# REQUEST_KEY): Triton ignores them, so they do not keep a request from merging (checked in the
# tests)
GATEWAY_PARAMETERS = frozenset({"precision", "x-request-key"})

Send = Callable[[Variant, bytes, "float | None"], Awaitable[bytes]]


class CannotSplit(Exception):
    """A merged reply that cannot be cut back per request (its members are re-sent alone)."""


@dataclass
class Member:
    request: pb.ModelInferRequest
    payload: bytes  # the client's own bytes, for a call alone
    rows: int
    deadline: float | None
    future: asyncio.Future[bytes]


@dataclass
class _Lane:
    """One variant's calls in flight and the requests waiting to be merged."""

    in_flight: int = 0
    waiting: dict[tuple, list[Member]] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None  # the wait for more, after a call ended


def mergeable(variant: Variant) -> bool:
    """Would Triton batch this variant's requests itself (see the module docstring)?"""
    config = variant.config
    return (
        config.max_batch_size > 0
        and config.HasField("dynamic_batching")
        and not config.HasField("sequence_batching")
        and not config.model_transaction_policy.decoupled
    )


def merge_key(request: pb.ModelInferRequest) -> tuple[tuple, int] | None:
    """(what must match for two requests to merge, the request's rows), or None: send alone."""
    inputs, raws = request.inputs, request.raw_input_contents
    if not inputs or len(raws) != len(inputs):
        return None
    if request.parameters and not GATEWAY_PARAMETERS.issuperset(request.parameters):
        return None
    rows = None
    key_inputs = []
    for tensor, raw in zip(inputs, raws, strict=True):
        size = _ITEM_SIZE.get(tensor.datatype)
        shape = tuple(tensor.shape)
        if size is None or tensor.parameters or not shape or shape[0] < 1:
            return None
        if rows is None:
            rows = shape[0]
        if shape[0] != rows or len(raw) != math.prod(shape) * size:
            return None
        key_inputs.append((tensor.name, tensor.datatype, shape[1:]))
    if any(o.parameters for o in request.outputs):
        return None
    assert rows is not None
    return (request.model_version, tuple(key_inputs), tuple(o.name for o in request.outputs)), rows


def merged_request(variant: Variant, members: list[Member]) -> bytes:
    """One ModelInferRequest carrying every member's rows, in order."""
    first = members[0].request
    total = sum(m.rows for m in members)
    merged = pb.ModelInferRequest(model_name=variant.name, model_version=first.model_version)
    for i, tensor in enumerate(first.inputs):
        merged.inputs.add(name=tensor.name, datatype=tensor.datatype).shape.extend(
            [total, *tensor.shape[1:]]
        )
        merged.raw_input_contents.append(b"".join(m.request.raw_input_contents[i] for m in members))
    for output in first.outputs:
        merged.outputs.add(name=output.name)
    return merged.SerializeToString()


def split_reply(data: bytes, members: list[Member]) -> list[bytes]:
    """A merged call's serialised reply -> each member's serialised reply (its rows, its id)."""
    try:
        reply = pb.ModelInferResponse.FromString(data)
    except DecodeError as e:
        raise CannotSplit(f"unreadable reply: {e}") from None
    total = sum(m.rows for m in members)
    outputs, raws = reply.outputs, reply.raw_output_contents
    if len(raws) != len(outputs):
        raise CannotSplit("reply outputs are not all raw contents")
    row_bytes = []
    for output, raw in zip(outputs, raws, strict=True):
        if output.datatype not in _ITEM_SIZE or not output.shape or output.shape[0] != total:
            raise CannotSplit(f"output {output.name!r} has no batch dimension of {total}")
        if len(raw) % total:
            raise CannotSplit(f"output {output.name!r}: {len(raw)} bytes for {total} rows")
        row_bytes.append(len(raw) // total)
    replies = []
    start = 0
    for member in members:
        one = pb.ModelInferResponse(
            model_name=reply.model_name, model_version=reply.model_version, id=member.request.id
        )
        for key, value in reply.parameters.items():
            one.parameters[key].CopyFrom(value)
        for output, raw, size in zip(outputs, raws, row_bytes, strict=True):
            tensor = one.outputs.add(name=output.name, datatype=output.datatype)
            tensor.shape.extend([member.rows, *output.shape[1:]])
            for key, value in output.parameters.items():
                tensor.parameters[key].CopyFrom(value)
            one.raw_output_contents.append(raw[start * size : (start + member.rows) * size])
        replies.append(one.SerializeToString())
        start += member.rows
    return replies


def _observe(variant: Variant, requests: int) -> None:
    """One upstream call carried ``requests`` requests."""
    metrics.upstream_call_requests(variant.model, variant.precision).observe(requests)


class ForwardMerger:
    """Per variant: at most ``limit * replicas(variant)`` forwarded calls in flight; requests
    beyond that wait and go merged when one ends, or ``wait_s`` after (``limit`` 0: never
    merge)."""

    def __init__(
        self, send: Send, replicas: Callable[[Variant], int], limit: int, wait_s: float = 0.0
    ) -> None:
        self._send = send
        self._replicas = replicas
        self.limit = limit
        self.wait_s = wait_s
        self._lanes: dict[str, _Lane] = {}
        self._tasks: set[asyncio.Task] = set()

    async def forward(self, variant: Variant, payload: bytes, deadline: float | None) -> bytes:
        lane = self._lanes.get(variant.name)
        if lane is None:
            if self.limit <= 0 or not mergeable(variant):
                reply = await self._send(variant, payload, deadline)
                _observe(variant, 1)
                return reply
            lane = self._lanes[variant.name] = _Lane()
        if lane.in_flight < self._cap(variant) and not lane.waiting:
            return await self._alone(variant, lane, payload, deadline)
        try:
            request = pb.ModelInferRequest.FromString(payload)
        except DecodeError:  # parsed once already by the gRPC handler; Triton words the error
            return await self._alone(variant, lane, payload, deadline)
        keyed = merge_key(request)
        if keyed is None:
            return await self._alone(variant, lane, payload, deadline)
        key, rows = keyed
        member = Member(
            request, payload, rows, deadline, asyncio.get_running_loop().create_future()
        )
        queue = lane.waiting.setdefault(key, [])
        queue.append(member)
        if lane.timer is not None and sum(m.rows for m in queue) >= variant.max_batch_size:
            lane.timer.cancel()  # a full call: no point in waiting for more
            lane.timer = None
        if lane.timer is None:
            self._drain(variant, lane)
        return await member.future

    def _cap(self, variant: Variant) -> int:
        return self.limit * max(1, self._replicas(variant))

    async def _alone(
        self, variant: Variant, lane: _Lane, payload: bytes, deadline: float | None
    ) -> bytes:
        lane.in_flight += 1
        try:
            reply = await self._send(variant, payload, deadline)
        finally:
            lane.in_flight -= 1
            self._ended(variant, lane)
        _observe(variant, 1)
        return reply

    def _drain(self, variant: Variant, lane: _Lane) -> None:
        """Start merged calls for the waiting requests while there is room in flight."""
        while lane.waiting and lane.in_flight < self._cap(variant):
            key = next(iter(lane.waiting))
            queue = [m for m in lane.waiting[key] if not m.future.done()]  # done: cancelled
            batch: list[Member] = []
            rows = 0
            while queue and (not batch or rows + queue[0].rows <= variant.max_batch_size):
                member = queue.pop(0)
                batch.append(member)
                rows += member.rows
            if queue:
                lane.waiting[key] = queue
            else:
                del lane.waiting[key]
            if not batch:
                continue
            lane.in_flight += 1
            task = asyncio.ensure_future(self._call(variant, lane, batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, variant: Variant, lane: _Lane, batch: list[Member]) -> None:
        try:
            if len(batch) == 1:
                await self._resend(variant, batch)
                return
            deadlines = [m.deadline for m in batch if m.deadline is not None]
            deadline = min(deadlines) if deadlines else None
            try:
                reply = await self._send(variant, merged_request(variant, batch), deadline)
                replies = split_reply(reply, batch)
            except UpstreamUnavailable as e:  # the variant, not a request: all fall back
                for member in batch:
                    if not member.future.done():
                        member.future.set_exception(e)
                return
            except (GatewayError, CannotSplit) as e:
                log.debug("merged call of %d for %s: %s; sent alone", len(batch), variant.name, e)
                await self._resend(variant, batch)
                return
            _observe(variant, len(batch))
            for member, one in zip(batch, replies, strict=True):
                if not member.future.done():
                    member.future.set_result(one)
        except BaseException as e:  # never leave a member waiting (cancelled: at shutdown)
            for member in batch:
                if member.future.done():
                    continue
                if isinstance(e, Exception):
                    member.future.set_exception(e)
                else:
                    member.future.cancel()
            if not isinstance(e, Exception):
                raise
        finally:
            lane.in_flight -= 1
            self._ended(variant, lane)

    def _ended(self, variant: Variant, lane: _Lane) -> None:
        """A call ended: the waiting requests go now, or after ``wait_s`` for more to join."""
        if self.wait_s <= 0 or not lane.waiting:
            self._drain(variant, lane)
        elif lane.timer is None:
            lane.timer = asyncio.get_running_loop().call_later(
                self.wait_s, self._waited, variant, lane
            )

    def _waited(self, variant: Variant, lane: _Lane) -> None:
        lane.timer = None
        self._drain(variant, lane)

    async def _resend(self, variant: Variant, batch: list[Member]) -> None:
        """Each member as its own call, its own bytes; each future gets its own answer."""

        async def one(member: Member) -> None:
            try:
                reply = await self._send(variant, member.payload, member.deadline)
            except Exception as e:
                if not member.future.done():
                    member.future.set_exception(e)
                return
            _observe(variant, 1)
            if not member.future.done():
                member.future.set_result(reply)

        await asyncio.gather(*(one(m) for m in batch if not m.future.done()))

    async def close(self) -> None:
        for lane in self._lanes.values():
            if lane.timer is not None:
                lane.timer.cancel()
                lane.timer = None
            for queue in lane.waiting.values():  # nobody will send them now
                for member in queue:
                    member.future.cancel()
            lane.waiting.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = [
    "GATEWAY_PARAMETERS",
    "CannotSplit",
    "ForwardMerger",
    "Member",
    "merge_key",
    "mergeable",
    "merged_request",
    "split_reply",
]
