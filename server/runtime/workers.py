"""``--workers N``: N gateway processes behind the same gRPC and HTTP ports.

The supervisor (this module, in the ``precision-serve`` process) creates no gRPC object: it picks
the ports (binding port 0 with ``SO_REUSEPORT`` and holding that socket until the workers are
up), starts N fresh ``python -m server.runtime.process`` worker processes and serves ``/metrics``
itself from prometheus-client's multiprocess directory, so one scrape sees the sum over the
workers. Workers are started as new interpreters rather than forked, so no gRPC or ONNX Runtime
state is ever shared.

The first worker starts alone and resolves the front as a single gateway does
(``front=auto``: Envoy unless it is not installed or a replica's tritonserver crashes on
cancels). With Envoy, ONE Envoy (the first worker's child) listens on the public ports and the
workers are its control planes: the supervisor has reserved N-1 loopback port pairs too, the
first worker's ``control_grpc``/``control_http`` clusters hold its own loopback ports and those,
and the others then start on them (plain, ``front_worker=peer``); shadow samples, the split
weights and the slo controllers stay with the first worker, which also serves Envoy's families
(not multiprocess values) on a loopback port the supervisor's ``/metrics`` appends. With the
Python front, every worker binds the public ports with ``SO_REUSEPORT`` (the kernel spreads
connections over them).

SIGTERM/SIGINT is passed on to every worker; each drains as a single gateway does (not ready
for ``--shutdown drain=S`` with its listeners open, then finishing what is in flight; a peer
behind Envoy keeps its listeners open for drain + grace, while Envoy may still send to it) and
the supervisor exits 0 when all of them did. A worker that dies on its own stops the rest
(exit 1); one that fails to start fails the start-up (exit 2).

A worker gets the supervisor's own options as :meth:`CommandLine.argv` writes them back (the
option groups' one definition), with the ports the supervisor reserved, its own ready file, one
worker and its part in the front (the hidden ``front_worker`` option); the bearer token reaches it
the way it reached the supervisor (``--auth-token-file``, or the environment it inherits), never
on its command line.
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
from typing import Any

import aiohttp
from aiohttp import web

from common.model_repository import RepositoryError, atomic_write_text
from server.app import LOOPBACK, FrontWorker, Shutdown, front_setting
from server.errors import ConfigError
from server.routing.policies import load_routing
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
        self.peers: list[tuple[int, int]] = []  # the peers' loopback (gRPC, HTTP) ports
        self.front = "python"  # what the first worker resolved: "envoy" or "python"
        self._envoy_metrics_port: int | None = None

    # ---- start ----------------------------------------------------------------------------
    async def start(self) -> dict[str, int]:
        listen = self.listen
        held = []
        try:
            for name, port in (("grpc_port", listen.grpc_port), ("http_port", listen.http_port)):
                sock, self.ports[name] = _reserve(listen.host, port)
                held.append(sock)
            if self.workers > 1 and self._may_run_envoy():
                for _ in range(self.workers - 1):  # the peers' control planes, if Envoy runs
                    pair = []
                    for _ in ("grpc", "http"):
                        sock, port = _reserve(LOOPBACK, 0)
                        held.append(sock)
                        pair.append(port)
                    self.peers.append((pair[0], pair[1]))
            await self._serve_metrics()
            # the first worker resolves the front as a single gateway does; the others follow
            self.procs.append(self._spawn(0))
            first = await self._wait_ready()
            self.front = first.get("front", "python")
            self._envoy_metrics_port = first.get("envoy_metrics_port")
            if "envoy_admin_port" in first:
                self.ports["envoy_admin_port"] = first["envoy_admin_port"]
            for i in range(1, self.workers):
                self.procs.append(self._spawn(i))
            await self._wait_ready()
        finally:
            for sock in held:
                sock.close()
        ready_file = self.command_line.process.ready_file
        if ready_file is not None:
            doc = {
                **self.ports,
                "pid": os.getpid(),
                "workers": [p.pid for p in self.procs],
                "front": self.front,
            }
            try:
                atomic_write_text(Path(ready_file), json.dumps(doc))
            except RepositoryError as e:
                raise ConfigError(f"cannot write --ready-file: {e}") from e
        log.info(
            "precision-serve ready with %d workers (%s front): %s",
            self.workers,
            self.front,
            self.ports,
        )
        return self.ports

    def _may_run_envoy(self) -> bool:
        """Whether the upstream URLs ask for the Envoy front (envoy, or auto: the first worker
        decides), computed as the gateway computes it (server/app.py ``front_setting``)."""
        routing = load_routing(self.command_line.routing.routing)
        return front_setting(self.command_line.upstream, routing.pools) in ("envoy", "auto")

    def worker_argv(self, index: int) -> list[str]:
        """A worker's arguments: the supervisor's options, on the reserved ports (metrics: the
        supervisor's alone), with the worker's own ready file. The first worker gets the peers'
        control ports (for its Envoy, if it runs one); behind its Envoy, a peer listens on its
        reserved loopback ports, plain, and keeps them open while Envoy may still send to it
        (its drain: the first worker's drain and grace)."""
        changes: dict[str, Any] = {
            "workers": 1,
            "ready_file": self._dir / f"worker-{index}.json",
            "ports": Ports(http=self.ports["http_port"], grpc=self.ports["grpc_port"], metrics=0),
            "front_worker": FrontWorker(tuple(self.peers) if index == 0 else ()),
        }
        if index > 0 and self.front == "envoy":  # a control plane behind the first's Envoy
            grpc_port, http_port = self.peers[index - 1]
            shutdown = self.command_line.process.shutdown
            changes |= {
                "host": LOOPBACK,
                "tls": None,
                "ports": Ports(http=http_port, grpc=grpc_port, metrics=0),
                "shutdown": Shutdown(shutdown.drain_s + shutdown.grace_s, shutdown.grace_s),
                "front_worker": FrontWorker(peer=True),
            }
        return self.command_line.argv(**changes)

    def _spawn(self, index: int) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "server.runtime.process", *self.worker_argv(index)]
        env = {**os.environ, MULTIPROC_ENV: str(self._metrics_dir)}
        return subprocess.Popen(cmd, env=env)

    async def _wait_ready(self) -> dict[str, Any]:
        """Until every worker started so far wrote its ready file; the first one's contents."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WORKER_START_TIMEOUT_S
        files = [self._dir / f"worker-{i}.json" for i in range(len(self.procs))]
        while True:
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    raise ConfigError(f"worker {i} exited with {proc.returncode} during start-up")
            if all(f.exists() for f in files):
                return json.loads(files[0].read_text())
            if loop.time() > deadline:
                raise ConfigError(f"workers not ready after {WORKER_START_TIMEOUT_S:.0f}s")
            await asyncio.sleep(0.05)

    async def _serve_metrics(self) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self._metrics_dir))

        async def metrics(request: web.Request) -> web.Response:
            body = generate_latest(registry) + await self._envoy_families()
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

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

    async def _envoy_families(self) -> bytes:
        """The first worker's Envoy families (precision_serve_envoy_*: read from Envoy at scrape
        time, not multiprocess values); unreachable: left out of this scrape."""
        if self._envoy_metrics_port is None:
            return b""
        url = f"http://{LOOPBACK}:{self._envoy_metrics_port}/metrics"
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
                session.get(url) as reply,
            ):
                if reply.status != 200:
                    return b""
                return await reply.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            log.warning("Envoy's metrics from the first worker: %s", e)
            return b""

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
        # peers behind Envoy drain for drain + grace, then have their grace
        deadline = loop.time() + shutdown.drain_s + 2 * shutdown.grace_s + 30.0
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
