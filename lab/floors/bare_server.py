"""The floors with the model: the least a Python gRPC server can do to serve the same variants.

``python -m lab.floors.bare_server --repository DIR --mode MODE --ready-file PATH [--threads N]
[--forward HOST:PORT]`` binds 127.0.0.1 on an OS-picked port, writes ``{"grpc_port": N,
"pid": P}`` to the ready file and serves ``ModelInfer`` until SIGTERM:

- ``aio`` (grpc.aio, the gateway's framework) and ``sync`` (grpc's thread-pool server): every
  variant of the repository on its manifest's engine, options and thread count - as the
  gateway loads it - and per request only what serving needs: parse the request, run the
  engine on its raw inputs, reply with the raw outputs. No checks, routing, metrics, batching,
  deadlines or error handling (a bad request fails however it fails).
- ``forward``: a grpc.aio server passing each request's bytes to ``--forward`` (Triton) with
  one grpc.aio call and returning the reply's bytes: the least the gateway -> Triton path does.
- ``forward-http``: the same over Triton's HTTP port (``--forward`` HOST:HTTP_PORT), the second
  hop on raw keep-alive sockets (:mod:`lab.floors.http_forward`): the cheapest client leg measured.

Every mode runs on the gateway's event loop (``server.runtime.event_loop``: uvloop when installed).

The benchmark (:mod:`bench.serving`, paths (h)-(k)) measures them beside the gateway: what one
of them cannot reach, no handler written on that framework reaches either.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from lab.floors.http_forward import serve_forward_http
from lab.floors.ready_server import (
    SERVICE,
    ReadyFileServer,
    announce,
    model_infer_handler,
    serve_aio_until_signal,
)
from server.runtime.event_loop import run_loop

METHOD = f"/{SERVICE}/ModelInfer"
FORWARDERS = ("forward", "forward-http")  # modes that take --forward, not --repository
MODES = ("aio", "sync", *FORWARDERS)
POOL_THREADS = 4  # the sync server's handler threads (4 measured best for an echo at c1-c16)


def load_handler(repository: Path, threads: int) -> Callable[[bytes], bytes]:
    """``ModelInferRequest`` bytes -> ``ModelInferResponse`` bytes for every variant in
    ``repository`` (raw contents only)."""
    from common.engines import get_engine
    from common.model_repository.dtypes import from_datatype, to_datatype
    from common.model_repository.manifest import load_manifests

    sessions = {}
    for manifest in load_manifests(repository).values():
        for v in manifest.variants.values():
            engine = get_engine(v.engine)
            sessions[v.triton_name] = engine.load(repository / v.file, v.engine_options, threads)

    def handle(data: bytes) -> bytes:
        request = pb.ModelInferRequest.FromString(data)
        session = sessions[request.model_name]
        feeds = {  # copied, as the gateway's decode does (OpenVINO refuses read-only arrays)
            t.name: np.frombuffer(raw, from_datatype(t.datatype)).reshape(tuple(t.shape)).copy()
            for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)
        }
        outputs = session.run(feeds)
        reply = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        for name, value in outputs.items():
            out = reply.outputs.add(name=name, datatype=to_datatype(value.dtype))
            out.shape.extend(value.shape)
            reply.raw_output_contents.append(np.ascontiguousarray(value).tobytes())
        return reply.SerializeToString()

    return handle


def serve_sync(handle: Callable[[bytes], bytes], ready_file: Path) -> None:
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=POOL_THREADS))
    server.add_generic_rpc_handlers((model_infer_handler(lambda data, context: handle(data)),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    announce(ready_file, port)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(1)


async def serve_aio(handle: Callable[[bytes], bytes], ready_file: Path) -> None:
    async def infer(data: bytes, context: object) -> bytes:
        return handle(data)

    await serve_aio_until_signal(infer, ready_file)


async def serve_forward(upstream: str, ready_file: Path) -> None:
    import grpc

    channel = grpc.aio.insecure_channel(upstream)
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)

    async def infer(data: bytes, context: object) -> bytes:
        return await call(data)

    await serve_aio_until_signal(infer, ready_file)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.floors.bare_server")
    p.add_argument("--repository", type=Path)
    p.add_argument("--mode", choices=MODES, required=True)
    p.add_argument(
        "--forward", help="HOST:PORT of Triton's gRPC (--mode forward) or HTTP (forward-http) port"
    )
    p.add_argument("--threads", type=int, default=0, help="engine threads (0 = the engine's)")
    p.add_argument("--ready-file", type=Path, required=True)
    args = p.parse_args(argv)
    if (args.mode in FORWARDERS) != bool(args.forward):
        p.error("--forward HOST:PORT goes with --mode forward or forward-http, and only with them")
    if args.mode not in FORWARDERS and args.repository is None:
        p.error(f"--mode {args.mode} needs --repository")
    if args.mode == "forward":
        run_loop(serve_forward(args.forward, args.ready_file))
    elif args.mode == "forward-http":
        run_loop(serve_forward_http(args.forward, args.ready_file))
    elif args.mode == "sync":
        serve_sync(load_handler(args.repository, args.threads), args.ready_file)
    else:
        run_loop(serve_aio(load_handler(args.repository, args.threads), args.ready_file))
    return 0


class BareServer(ReadyFileServer):
    """``with BareServer("aio", repository=R, threads=2) as s: s.grpc_url`` (or ``"sync"``, or
    ``BareServer("forward", forward=TRITON_URL)``, ``BareServer("forward-http",
    forward=TRITON_HTTP_URL)``): the bare server in a subprocess."""

    def __init__(
        self,
        mode: str,
        repository: Path | None = None,
        threads: int = 0,
        forward: str | None = None,
        timeout: float = 300.0,
    ) -> None:
        args = ["--mode", mode, "--threads", str(threads)]
        if repository is not None:
            args += ["--repository", str(repository)]
        if forward:
            args += ["--forward", forward]
        super().__init__("lab.floors.bare_server", args, f"the bare {mode} server", timeout)


if __name__ == "__main__":
    sys.exit(main())
