"""The cheapest client leg measured here: Triton's HTTP/REST protocol on raw keep-alive sockets.

:func:`serve_forward_http` is a grpc.aio server (the gateway's framework and loop) that turns
each ``ModelInferRequest`` into one ``POST /v2/models/<name>/infer`` with the binary tensor data
extension and Triton's reply back into a ``ModelInferResponse``: a floor for the gateway ->
Triton path with the second hop on the least Python can do per call (an ``asyncio.Protocol``
per keep-alive connection, one connection per call in flight, no HTTP library), next to the
grpc.aio forwarder of :mod:`lab.floors.bare_server`. Like the other bare servers it does only what
the benchmark's requests need: ``raw_input_contents`` (no typed contents, no parameters, no
shared memory); a failing call fails however it fails.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from lab.floors.ready_server import serve_aio_until_signal

HEADER_LENGTH = "inference-header-content-length"


class HttpForwardError(RuntimeError):
    """Triton answered with something else than a 200 reply with a length."""


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one call at a time."""

    def __init__(self) -> None:
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.reply: asyncio.Future[tuple[int, dict[str, str], bytes]] | None = None
        self._buf = bytearray()
        self._head: tuple[int, dict[str, str], int] | None = None  # status, headers, body start
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(HttpForwardError(f"Triton closed the connection ({exc})"))

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._head is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self._buf[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            self._head = (int(lines[0].split(" ", 2)[1]), headers, end + 4)
        status, headers, start = self._head
        if "content-length" not in headers:
            self._fail(HttpForwardError(f"Triton replied {status} without a Content-Length"))
            return
        stop = start + int(headers["content-length"])
        if len(self._buf) < stop:
            return
        body = bytes(self._buf[start:stop])
        del self._buf[:stop]
        self._head = None
        reply, self.reply = self.reply, None
        if reply is not None and not reply.done():
            reply.set_result((status, headers, body))

    def _fail(self, e: Exception) -> None:
        reply, self.reply = self.reply, None
        if reply is not None and not reply.done():
            reply.set_exception(e)
        if self.transport is not None:
            self.transport.close()


def http_request(request: pb.ModelInferRequest) -> bytes:
    """The request as one HTTP/1.1 message: JSON inference header, then the raw tensors."""
    inputs = [
        {
            "name": t.name,
            "shape": list(t.shape),
            "datatype": t.datatype,
            "parameters": {"binary_data_size": len(raw)},
        }
        for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
    ]
    header: dict[str, Any] = {"inputs": inputs}
    if request.outputs:
        header["outputs"] = [
            {"name": o.name, "parameters": {"binary_data": True}} for o in request.outputs
        ]
    else:
        header["parameters"] = {"binary_data_output": True}
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"".join((head, *request.raw_input_contents))
    start = (
        f"POST /v2/models/{request.model_name}/infer HTTP/1.1\r\nHost: triton\r\n"
        f"Inference-Header-Content-Length: {len(head)}\r\n"
        f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return start.encode() + body


def grpc_response(status: int, headers: dict[str, str], body: bytes) -> bytes:
    """Triton's HTTP reply (binary outputs) as a serialised ``ModelInferResponse``."""
    if status != 200:
        raise HttpForwardError(f"Triton answered HTTP {status}: {body[:200]!r}")
    length = int(headers.get(HEADER_LENGTH, len(body)))
    header = json.loads(body[:length])
    response = pb.ModelInferResponse(
        model_name=header["model_name"],
        model_version=header.get("model_version", ""),
        id=header.get("id", ""),
    )
    offset = length
    for out in header["outputs"]:
        size = out["parameters"]["binary_data_size"]
        tensor = response.outputs.add(name=out["name"], datatype=out["datatype"])
        tensor.shape.extend(out["shape"])
        response.raw_output_contents.append(body[offset : offset + size])
        offset += size
    return response.SerializeToString()


async def serve_forward_http(upstream: str, ready_file: Path) -> None:
    """Serve ``ModelInfer`` by forwarding to Triton's HTTP port ``upstream`` (HOST:PORT)."""
    host, _, port = upstream.rpartition(":")
    loop = asyncio.get_running_loop()
    idle: list[_Connection] = []

    async def infer(data: bytes, context: object) -> bytes:
        message = http_request(pb.ModelInferRequest.FromString(data))
        while idle and idle[-1].closed:
            idle.pop()
        if idle:
            conn = idle.pop()
        else:
            _, conn = await loop.create_connection(_Connection, host, int(port))
        conn.reply = loop.create_future()
        conn.transport.write(message)
        try:
            status, headers, body = await conn.reply
        except BaseException:
            if conn.transport is not None:
                conn.transport.close()  # a reply may still come: never reuse this connection
            raise
        idle.append(conn)
        return grpc_response(status, headers, body)

    await serve_aio_until_signal(infer, ready_file)
