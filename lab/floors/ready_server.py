"""Bench servers in subprocesses that announce themselves through a ready file.

Child side: :func:`announce` writes ``{"grpc_port": N, "pid": P}`` once the server serves, and
:func:`serve_aio_until_signal` runs a grpc.aio server with one generic ``ModelInfer`` handler
until SIGTERM/SIGINT. Parent side: :class:`ReadyFileServer` starts ``python -m MODULE ARGS
--ready-file PATH``, waits for the file (or the process's death, with its log's tail), exposes
``grpc_url`` and ``pid``, and stops it (terminate -> wait -> kill) on exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from common import process

SERVICE = "inference.GRPCInferenceService"


def announce(ready_file: Path, port: int) -> None:
    tmp = ready_file.with_name(ready_file.name + ".tmp")
    tmp.write_text(json.dumps({"grpc_port": port, "pid": os.getpid()}))
    tmp.replace(ready_file)


def model_infer_handler(infer: Callable) -> Any:
    """A generic handler for ``ModelInfer`` taking and returning bytes (no (de)serializers)."""
    import grpc

    method = grpc.unary_unary_rpc_method_handler(
        infer, request_deserializer=None, response_serializer=None
    )
    return grpc.method_handlers_generic_handler(SERVICE, {"ModelInfer": method})


async def serve_aio_until_signal(
    infer: Callable[[bytes, Any], Awaitable[bytes]],
    ready_file: Path,
    options: Sequence[tuple[str, Any]] = (),
) -> None:
    import grpc

    server = grpc.aio.server(options=list(options))
    server.add_generic_rpc_handlers((model_infer_handler(infer),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    announce(ready_file, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


class ReadyFileServer:
    error: type[Exception] = process.ProcessError  # raised when it does not become ready
    grace: float = 10.0  # seconds between SIGTERM and SIGKILL on exit

    def __init__(
        self,
        module: str,
        args: list[str],
        what: str,
        timeout: float,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.module = module
        self.args = args
        self.what = what
        self.timeout = timeout
        self.env = env
        self._tmp = tempfile.TemporaryDirectory(prefix=f"bench-{module.rsplit('.', 1)[-1]}-")
        self.log_path = Path(self._tmp.name) / "server.log"
        self.proc: subprocess.Popen | None = None
        self.grpc_url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> ReadyFileServer:
        ready = Path(self._tmp.name) / "ready.json"
        cmd = [sys.executable, "-m", self.module, *self.args, "--ready-file", str(ready)]
        self.proc = process.start(cmd, log_path=self.log_path, env=self.env)
        try:
            process.wait_ready(
                ready.exists,
                self.timeout,
                self.what,
                proc=self.proc,
                log=self.log_path,
                interval=0.05,
            )
        except process.ProcessError as e:
            self.__exit__()
            if isinstance(e, self.error):
                raise
            raise self.error(str(e)) from e
        self.grpc_url = f"127.0.0.1:{json.loads(ready.read_text())['grpc_port']}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            process.stop(self.proc, grace=self.grace)
        self._tmp.cleanup()
