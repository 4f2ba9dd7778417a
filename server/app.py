"""Assemble and run the gateway: repository -> router -> upstream -> core -> gRPC/HTTP/metrics.

:class:`GatewayServer` starts everything in the running event loop (tests can inject an
upstream); :func:`serve` runs until SIGTERM/SIGINT, then stops accepting, lets in-flight
requests finish within the grace period and returns. ``GatewayProcess`` (server/runtime/runner.py)
runs ``python -m server.cli`` as a subprocess for tests, the load test and benchmarks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from common.model_repository import RepositoryError, atomic_write_text
from server.catalog import load_repository
from server.dataplane.gateway import Gateway
from server.dataplane.model_control import MODES as MODEL_CONTROL_MODES
from server.dataplane.model_control import ModelControl
from server.errors import ConfigError
from server.routing.policies import Router, load_routing
from server.routing.retime import check_mode, retime_repository
from server.transports.grpc.service import ENVELOPE_BYTES, start_grpc_server
from server.transports.http.app import HttpLimits, start_http_server
from server.transports.http.limits import shutdown_parsers
from server.transports.request_bounds import (
    LIMIT_MODES,
    concurrent_rpcs,
    payload_limit,
    request_bound,
)
from server.upstreams.base import (
    DEFAULT_MERGE_LIMIT,
    Upstream,
    UpstreamSettings,
    create_upstream,
)
from server.upstreams.pools import create_pooled_upstream

log = logging.getLogger(__name__)

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_DRAIN_S = 5.0


@dataclass
class ServeOptions:
    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    upstream: str = "embedded"
    routing: Path | None = None
    ready_file: Path | None = None
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    # "models": gRPC's message limit is the models' largest valid request (request_bounds.py)
    message_limit: str = "models"
    # Triton upstream: cancel calls whose client cancelled (--triton-cancellation propagate)
    cancel_upstream: bool = False
    # Triton pass-through: calls in flight per variant and replica before requests merge
    # (--triton-merge; server/upstreams/triton/merging.py); 0: never merge
    triton_merge: int = DEFAULT_MERGE_LIMIT
    # ... and the milliseconds waiting requests wait for more once a call ends (0: go at once)
    triton_merge_wait_ms: float = 0.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_token: str | None = None
    threads: int = 0
    retime: str = "auto"  # re-time variants on this host before auto ranks them (retime.py)
    grace_s: float = 10.0
    # 0 = no limit; None (auto): request_bounds.concurrent_rpcs of the gRPC message limit
    grpc_max_concurrent_rpcs: int | None = None
    # SIGTERM: seconds between "not ready" and closing the listeners (load balancers move away);
    # the CLI's default is DEFAULT_DRAIN_S, an in-process gateway (tests) stops at once
    drain_s: float = 0.0
    http: HttpLimits = field(default_factory=HttpLimits)
    restricted_api: frozenset[str] = frozenset()  # groups that need the token (restricted.py)
    # started by ``--workers`` (server/runtime/workers.py): bind the shared ports with SO_REUSEPORT
    # and leave /metrics to the supervisor
    worker: bool = False
    model_control: str = "none"  # "explicit": load/unload through the API (model_control.py)

    def __post_init__(self) -> None:
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ConfigError(
                f"--model-control must be one of {', '.join(MODEL_CONTROL_MODES)}, "
                f"got {self.model_control!r}"
            )
        for name in ("grpc_port", "http_port", "metrics_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"--{name.replace('_', '-')} must be 0..65535, got {port}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("--tls-cert and --tls-key must be given together")
        if self.max_request_bytes < 1024:
            raise ConfigError(f"--max-request-bytes must be >= 1024, got {self.max_request_bytes}")
        if self.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {self.threads}")
        if self.triton_merge < 0:
            raise ConfigError(f"--triton-merge must be >= 0, got {self.triton_merge}")
        if not self.triton_merge_wait_ms >= 0:  # NaN too
            raise ConfigError(
                f"--triton-merge-wait must be >= 0 ms, got {self.triton_merge_wait_ms}"
            )
        check_mode(self.retime)
        if self.message_limit not in LIMIT_MODES:
            raise ConfigError(
                f"--message-limit must be one of {', '.join(LIMIT_MODES)}, "
                f"got {self.message_limit!r}"
            )
        if self.grpc_max_concurrent_rpcs is not None and self.grpc_max_concurrent_rpcs < 0:
            raise ConfigError(
                f"--grpc-max-concurrent-rpcs must be >= 0, got {self.grpc_max_concurrent_rpcs}"
            )
        if not (math.isfinite(self.drain_s) and self.drain_s >= 0):
            raise ConfigError(f"--drain-seconds must be >= 0, got {self.drain_s}")
        if self.restricted_api and not self.auth_token:
            raise ConfigError("--restricted-api needs a token (--auth-token or --auth-token-file)")


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from e


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


class GatewayServer:
    def __init__(self, options: ServeOptions, upstream: Upstream | None = None) -> None:
        self.options = options
        repository = load_repository(options.repository)
        routing = load_routing(options.routing)
        # this host's speeds before auto ranks (server/routing/retime.py; only embedded is timed)
        upstream_kind = "pools" if routing.pools else options.upstream
        retime_repository(repository, options.retime, upstream_kind, options.threads)
        router = Router(repository, routing)
        if upstream is None:
            settings = UpstreamSettings(
                threads=options.threads,
                cancel_upstream=options.cancel_upstream,
                merge_limit=options.triton_merge,
                merge_wait_s=options.triton_merge_wait_ms / 1e3,
            )
            if routing.pools:  # precision pools (server/upstreams/pools.py)
                upstream = create_pooled_upstream(
                    options.upstream,
                    routing.pools,
                    routing.pool_assignment(repository),
                    repository,
                    settings,
                )
            else:
                upstream = create_upstream(options.upstream, repository, settings)
        self.gateway = Gateway(
            repository,
            router,
            upstream,
            options.max_request_bytes,
            options.auth_token,
            options.restricted_api,
        )
        if options.worker:  # a region registered with one worker would be unknown to the others
            self.gateway.shared_memory.refuse = "system shared memory needs --workers 1"
        self.control = ModelControl(self.gateway, options.model_control)
        self.ports: dict[str, int] = {}
        self._grpc: grpc.aio.Server | None = None
        self._runners: list[web.AppRunner] = []

    def _tls(self) -> tuple[tuple[bytes, bytes] | None, ssl.SSLContext | None]:
        o = self.options
        if o.tls_cert is None or o.tls_key is None:
            return None, None
        cert, key = _read(o.tls_cert, "TLS certificate"), _read(o.tls_key, "TLS key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(str(o.tls_cert), str(o.tls_key))
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"cannot load TLS certificate/key: {e}") from e
        return (cert, key), ctx

    def grpc_payload_limit(self) -> int:
        """``--max-request-bytes``, or less: the models' largest valid request."""
        o = self.options
        bound = request_bound(self.gateway.repository)
        limit = payload_limit(bound, o.max_request_bytes, o.message_limit)
        if limit < o.max_request_bytes:
            log.info(
                "gRPC messages limited to %d bytes + envelope: the largest valid request (%s)",
                limit,
                bound.describe(),
            )
        elif o.message_limit == "models" and bound.unbounded:
            log.info(
                "gRPC messages limited by --max-request-bytes %d only: %s have dynamic dims "
                "without a manifest max_shape",
                o.max_request_bytes,
                ", ".join(bound.unbounded),
            )
        return limit

    async def start(self) -> dict[str, int]:
        o = self.options
        grpc_tls, http_tls = self._tls()
        await self.gateway.start()
        try:
            limit = self.grpc_payload_limit()
            calls = o.grpc_max_concurrent_rpcs
            if calls is None:
                calls = concurrent_rpcs(limit + ENVELOPE_BYTES)
                log.info("gRPC calls in flight limited to %d (--grpc-max-concurrent-rpcs)", calls)
            self._grpc, self.ports["grpc_port"] = await start_grpc_server(
                self.gateway, self.control, o.host, o.grpc_port, limit, grpc_tls, o.worker, calls
            )
        except RuntimeError as e:
            raise ConfigError(f"cannot bind gRPC port {o.host}:{o.grpc_port}: {e}") from e
        try:
            runner, self.ports["http_port"] = await start_http_server(
                self.gateway,
                self.control,
                o.host,
                o.http_port,
                http_tls,
                o.grace_s,
                o.worker,
                o.http,
            )
            self._runners.append(runner)
            if not o.worker:
                await self._start_metrics()
        except OSError as e:
            raise ConfigError(
                f"cannot bind HTTP/metrics port on {o.host}: {e.strerror or e}"
            ) from e
        if o.ready_file is not None:
            try:
                atomic_write_text(
                    Path(o.ready_file), json.dumps({**self.ports, "pid": os.getpid()})
                )
            except RepositoryError as e:
                raise ConfigError(f"cannot write --ready-file: {e}") from e
        log.info("precision-serve ready: %s", self.ports)
        return self.ports

    async def _start_metrics(self) -> None:
        o = self.options
        metrics_app = web.Application()
        metrics_app.router.add_get("/metrics", _metrics)
        runner = web.AppRunner(metrics_app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, o.host, o.metrics_port)
        await site.start()
        self._runners.append(runner)
        self.ports["metrics_port"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Not ready at once; keep serving for the drain delay (a load balancer sees the 503 and
        moves away); then stop accepting, let in-flight requests finish within the grace
        period, close."""
        self.gateway.drain()
        if self.options.drain_s > 0 and self._runners:
            log.info("precision-serve: not ready; closing in %.1fs", self.options.drain_s)
            await asyncio.sleep(self.options.drain_s)
        tasks = [runner.cleanup() for runner in self._runners]
        if self._grpc is not None:
            tasks.append(self._grpc.stop(self.options.grace_s))
        await asyncio.gather(*tasks, return_exceptions=True)
        shutdown_parsers()
        await self.gateway.close()


async def serve(options: ServeOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = GatewayServer(options)
    try:
        await server.start()
        await stop.wait()
        log.info(
            "precision-serve: signal received, draining (drain %.1fs, grace %.0fs)",
            options.drain_s,
            options.grace_s,
        )
    finally:
        await server.stop()
