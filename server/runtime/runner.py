"""Run a gateway from Python: the demo, the load test, the benchmarks and the tests use it.

``GatewayProcess``: ``python -m server.cli`` in a subprocess on OS-picked ports (port 0 + ready
file), waits for the ready file and /v2/health/ready, stops terminate -> wait -> kill
(:mod:`common.process`).
``InProcessGateway``: the same servers on a background event-loop thread of this process, with an
optional injected upstream (for routing/fallback tests with a test double).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from common import process


class GatewayStartError(process.ProcessError, RuntimeError):
    """The gateway did not become ready."""


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


class _Urls:
    host: str = "127.0.0.1"
    ports: dict[str, int]

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc_port']}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports['http_port']}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.ports['metrics_port']}/metrics"


class GatewayProcess(_Urls):
    """``with GatewayProcess(repo) as gw: tritonclient.grpc.InferenceServerClient(gw.grpc_url)``.

    ``extra_args`` go to the CLI (e.g. ``["--routing", "r.yaml"]``); ``env`` adds variables.
    """

    def __init__(
        self,
        repository: Path,
        extra_args: list[str] | None = None,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        wait_ready: bool = True,
    ) -> None:
        self.repository = Path(repository)
        self.extra_args = list(extra_args or [])
        self.timeout = timeout
        self.env = env
        self.host = host
        self.wait_ready = wait_ready
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="precision-serve-")
        self.ready_file = Path(self._tmp.name) / "ready.json"
        self.log_path = Path(self._tmp.name) / "gateway.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> GatewayProcess:
        cmd = [
            sys.executable,
            "-m",
            "server.cli",
            "--repository",
            str(self.repository),
            "--host",
            self.host,
            "--ports",
            "0",
            "--ready-file",
            str(self.ready_file),
            "--shutdown",  # stop at once unless ``extra_args`` ask for a drain delay
            "drain=0",
            *self.extra_args,
        ]
        env = {**os.environ, **(self.env or {})}
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = process.start(cmd, log_path=self.log_path, env=env)
        try:
            process.wait_ready(
                self._ready, self.timeout, "the gateway", proc=self.proc, log=self.log_path
            )
        except process.ProcessError as e:
            self.stop()
            raise GatewayStartError(str(e)) from e
        return self

    def _ready(self) -> bool:
        if not self.ready_file.exists():
            return False
        self.ports = json.loads(self.ready_file.read_text())
        return not self.wait_ready or _http_ok(f"http://{self.http_url}/v2/health/ready")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 15.0) -> int | None:
        """terminate -> wait -> kill; returns the exit code."""
        return process.stop(self.proc, grace) if self.proc is not None else None

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        self._tmp.cleanup()


async def _finish_tasks() -> None:
    """Cancel and await what is still pending on this loop (as ``asyncio.run`` does on the way
    out): gRPC's per-call tasks outlive ``server.stop()`` by a few loop turns, and a loop closed
    under them leaves tasks that log "Task was destroyed but it is pending" whenever the garbage
    collector later meets them, in whatever code runs then."""
    me = asyncio.current_task()
    pending = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


class InProcessGateway(_Urls):
    """The gateway's servers on a private event loop in a background thread."""

    def __init__(self, options: Any, upstream: Any = None, timeout: float = 60.0) -> None:
        from server.app import GatewayServer

        self.host = options.listen.host
        self.server = GatewayServer(options, upstream=upstream)
        self.timeout = timeout
        self.ports: dict[str, int] = {}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def gateway(self) -> Any:
        return self.server.gateway

    def call(self, coro: Any) -> Any:
        """Run a coroutine on the gateway's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(self.timeout)

    def __enter__(self) -> InProcessGateway:
        self._thread.start()
        self.ports = self.call(self.server.start())
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self.server.stop())
            self.call(_finish_tasks())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
