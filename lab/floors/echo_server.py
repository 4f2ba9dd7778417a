"""The floor of a Python gRPC hop: a grpc.aio server whose ModelInfer answers at once.

``python -m lab.floors.echo_server --ready-file PATH`` binds 127.0.0.1 on an OS-picked port, writes
``{"grpc_port": N, "pid": P}`` to the ready file, and answers every ``ModelInfer`` with the same
small ``ModelInferResponse`` (no decoding, no model) until SIGTERM. :class:`EchoServer` runs it
for the benchmark: the gap between it and the gateway is what the gateway itself adds. It runs
on the gateway's event loop (uvloop when installed, ``server.runtime.event_loop``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tritonclient.grpc import service_pb2

from lab.floors.ready_server import ReadyFileServer, serve_aio_until_signal
from server.runtime.event_loop import run_loop


async def _serve(ready_file: Path) -> None:
    response = service_pb2.ModelInferResponse(model_name="echo").SerializeToString()

    async def infer(request: bytes, context: object) -> bytes:
        return response

    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    await serve_aio_until_signal(infer, ready_file, options)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.floors.echo_server")
    p.add_argument("--ready-file", type=Path, required=True)
    args = p.parse_args(argv)
    run_loop(_serve(args.ready_file))  # the gateway's loop
    return 0


class EchoServer(ReadyFileServer):
    """``with EchoServer() as e: e.grpc_url``: the echo server in a subprocess."""

    def __init__(self, timeout: float = 30.0) -> None:
        super().__init__("lab.floors.echo_server", [], "the echo server", timeout)


if __name__ == "__main__":
    sys.exit(main())
