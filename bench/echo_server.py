"""The floor of a Python gRPC hop: a grpc.aio server whose ModelInfer answers at once.

``python -m bench.echo_server --ready-file PATH`` binds 127.0.0.1 on an OS-picked port, writes
``{"grpc_port": N, "pid": P}`` to the ready file, and answers every ``ModelInfer`` with the same
small ``ModelInferResponse`` (no decoding, no model) until SIGTERM. :class:`EchoServer` runs it
for the benchmark: the gap between it and the gateway is what the gateway itself adds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tritonclient.grpc import service_pb2

from server import process

SERVICE = "inference.GRPCInferenceService"


async def _serve(ready_file: Path) -> None:
    import grpc

    response = service_pb2.ModelInferResponse(model_name="echo").SerializeToString()

    async def infer(request: bytes, context: object) -> bytes:
        return response

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                infer, request_deserializer=None, response_serializer=None
            )
        },
    )
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tmp = ready_file.with_name(ready_file.name + ".tmp")
    tmp.write_text(json.dumps({"grpc_port": port, "pid": os.getpid()}))
    tmp.replace(ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.echo_server")
    p.add_argument("--ready-file", type=Path, required=True)
    args = p.parse_args(argv)
    asyncio.run(_serve(args.ready_file))
    return 0


class EchoServer:
    """``with EchoServer() as e: e.grpc_url``: the echo server in a subprocess."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-echo-")
        self.proc: subprocess.Popen | None = None
        self.grpc_url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> EchoServer:
        ready = Path(self._tmp.name) / "ready.json"
        log = Path(self._tmp.name) / "echo.log"
        cmd = [sys.executable, "-m", "bench.echo_server", "--ready-file", str(ready)]
        self.proc = process.start(cmd, log_path=log)
        try:
            process.wait_ready(
                ready.exists,
                self.timeout,
                "the echo server",
                proc=self.proc,
                log=log,
                interval=0.05,
            )
        except process.ProcessError:
            self.__exit__()
            raise
        self.grpc_url = f"127.0.0.1:{json.loads(ready.read_text())['grpc_port']}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            process.stop(self.proc, grace=10)
        self._tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
