"""``--workers N``: N gateway processes serving the same gRPC and HTTP ports.

The supervisor (this module, in the ``precision-serve`` process) creates no gRPC object: it picks
the ports (binding port 0 with ``SO_REUSEPORT`` and holding that socket until the workers are
up), starts N fresh ``python -m server.runtime.process`` worker processes that bind the same ports
with ``SO_REUSEPORT`` (the kernel spreads connections over them), and serves ``/metrics`` itself
from prometheus-client's multiprocess directory, so one scrape sees the sum over the workers.
Workers are started as new interpreters rather than forked, so no gRPC or ONNX Runtime state is ever
shared. SIGTERM/SIGINT is passed on to every worker; each drains as a single gateway does (not ready
for ``--shutdown drain=S`` with its listeners open, then finishing what is in flight) and
the supervisor exits 0 when all of them did. A worker that dies on its own stops the rest
(exit 1); one that fails to start fails the start-up (exit 2).

A worker gets the supervisor's own options as :meth:`CommandLine.argv` writes them back (the
option groups' one definition), with the ports the supervisor reserved, its own ready file and
one worker; the bearer token reaches it the way it reached the supervisor (``--auth-token-file``,
or the environment it inherits), never on its command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from common.model_repository import RepositoryError, atomic_write_text
from server.errors import ConfigError
from server.runtime.options import CommandLine
from server.transports.options import Ports

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_START_TIMEOUT_S = 600.0


def _reserve(host: str, port: int) -> tuple[socket.socket, int]:
    """A bound (not listening) SO_REUSEPORT socket holding ``port`` (0: the OS picks)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot bind port {host}:{port}: {e.strerror or e}") from e
    return sock, sock.getsockname()[1]


class Supervisor:
    def __init__(self, command_line: CommandLine) -> None:
        if command_line.security.model_control != "none":  # each worker would load on its own
            raise ConfigError("--model-control explicit needs --workers 1")
        self.command_line = command_line
        self.workers = command_line.process.workers
        self.listen = command_line.listen
        self.procs: list[subprocess.Popen] = []
        self.ports: dict[str, int] = {}
        self._dir = Path(tempfile.mkdtemp(prefix="precision-serve-workers-"))
        self._metrics_dir = self._dir / "metrics"
        self._metrics_dir.mkdir()
        self._runner: web.AppRunner | None = None

    # ---- start ----------------------------------------------------------------------------
    async def start(self) -> dict[str, int]:
        listen = self.listen
        held = []
        try:
            for name, port in (("grpc_port", listen.grpc_port), ("http_port", listen.http_port)):
                sock, self.ports[name] = _reserve(listen.host, port)
                held.append(sock)
            await self._serve_metrics()
            for i in range(self.workers):
                self.procs.append(self._spawn(i))
            await self._wait_ready()
        finally:
            for sock in held:
                sock.close()
        ready_file = self.command_line.process.ready_file
        if ready_file is not None:
            doc = {**self.ports, "pid": os.getpid(), "workers": [p.pid for p in self.procs]}
            try:
                atomic_write_text(Path(ready_file), json.dumps(doc))
            except RepositoryError as e:
                raise ConfigError(f"cannot write --ready-file: {e}") from e
        log.info("precision-serve ready with %d workers: %s", self.workers, self.ports)
        return self.ports

    def worker_argv(self, index: int) -> list[str]:
        """A worker's arguments: the supervisor's options, on the reserved ports (metrics: the
        supervisor's alone), with the worker's own ready file."""
        ports = Ports(http=self.ports["http_port"], grpc=self.ports["grpc_port"], metrics=0)
        ready_file = self._dir / f"worker-{index}.json"
        return self.command_line.argv(workers=1, ports=ports, ready_file=ready_file)

    def _spawn(self, index: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "server.runtime.process", *self.worker_argv(index)]
        env = {**os.environ, MULTIPROC_ENV: str(self._metrics_dir)}
        return subprocess.Popen(cmd, env=env)

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WORKER_START_TIMEOUT_S
        while True:
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    raise ConfigError(f"worker {i} exited with {proc.returncode} during start-up")
            if all((self._dir / f"worker-{i}.json").exists() for i in range(len(self.procs))):
                return
            if loop.time() > deadline:
                raise ConfigError(f"workers not ready after {WORKER_START_TIMEOUT_S:.0f}s")
            await asyncio.sleep(0.05)

    async def _serve_metrics(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._metrics_dir))

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(
                body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
            )

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.listen.host, self.listen.metrics_port)
        try:
            await site.start()
        except OSError as e:
            raise ConfigError(f"cannot bind metrics port: {e.strerror or e}") from e
        self.ports["metrics_port"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    # ---- run and stop -----------------------------------------------------------------------
    async def wait(self, stop: asyncio.Event) -> int:
        """Until ``stop`` is set (0) or a worker exits on its own (1)."""
        while not stop.is_set():
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    log.error("worker %d (pid %d) exited with %s", i, proc.pid, proc.returncode)
                    return 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)
        return 0

    async def stop(self) -> int:
        """SIGTERM every worker, wait for their drains; 0 when every one exited 0."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        shutdown = self.command_line.process.shutdown
        deadline = loop.time() + shutdown.drain_s + shutdown.grace_s + 30.0
        while any(p.poll() is None for p in self.procs) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for proc in self.procs:
            if proc.poll() is None:
                log.error("worker pid %d did not stop in time: killed", proc.pid)
                proc.kill()
                proc.wait()
        if self._runner is not None:
            await self._runner.cleanup()
        shutil.rmtree(self._dir, ignore_errors=True)
        return 0 if all(p.returncode == 0 for p in self.procs) else 1


async def supervise(command_line: CommandLine) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    supervisor = Supervisor(command_line)
    code = 0
    try:
        await supervisor.start()
        code = await supervisor.wait(stop)
        log.info("precision-serve: stopping %d workers", len(supervisor.procs))
    finally:
        stopped = await supervisor.stop()
    return code or stopped
