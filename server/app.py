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
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from common.model_repository import RepositoryError, atomic_write_text
from common.options import parse_pairs
from server.catalog import load_repository
from server.dataplane.gateway import Gateway
from server.dataplane.model_control import ModelControl
from server.dataplane.security import SecurityOptions
from server.errors import ConfigError
from server.front.config import (
    FrontPlan,
    ModelPlan,
    bootstrap,
    plan_models,
    ready_weights,
    served_variants,
    split_runtime,
    triton_endpoints,
)
from server.front.metrics import EnvoyCollector
from server.front.pools import PoolPlan, plan_pools, pools_front
from server.front.slo import EnvoySlo
from server.front.supervisor import EnvoyError, EnvoyFront, envoy_binary
from server.routing.options import RoutingOptions
from server.routing.policies import Router, load_routing
from server.routing.retime import retime_repository
from server.routing.slo import SloPolicy
from server.transports.grpc.service import ENVELOPE_BYTES, start_grpc_server
from server.transports.http.app import start_http_server
from server.transports.http.limits import shutdown_parsers
from server.transports.options import LimitsOptions, ListenOptions
from server.transports.request_bounds import concurrent_rpcs, payload_limit, request_bound
from server.upstreams.base import Upstream, create_upstream
from server.upstreams.options import UpstreamOptions
from server.upstreams.pools import create_pooled_upstream
from server.upstreams.triton.detach import FIXED_IN as CANCEL_FIXED_IN
from server.upstreams.triton.detach import crashes_on_cancel

log = logging.getLogger(__name__)

ENVOY_SCHEMES = ("triton", "triton+dns")
LOOPBACK = "127.0.0.1"
READINESS_INTERVAL_S = 1.0  # how often a split's weights follow the variants' readiness
DEFAULT_DRAIN_S = 5.0
DEFAULT_GRACE_S = 10.0


@dataclass(frozen=True)
class Shutdown:
    """SIGTERM/SIGINT: ``drain_s`` seconds of "not ready" with the listeners still open (load
    balancers move away), then ``grace_s`` for the requests in flight to finish."""

    drain_s: float = DEFAULT_DRAIN_S
    grace_s: float = DEFAULT_GRACE_S

    def __post_init__(self) -> None:
        for name, value in (("drain", self.drain_s), ("grace", self.grace_s)):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--shutdown {name} must be >= 0 seconds, got {value}")

    @classmethod
    def parse(cls, text: str) -> Shutdown:
        """``"drain=5,grace=10"``; a key left out keeps its default."""
        values: dict[str, float] = {}
        for key, value in parse_pairs(text, ("drain", "grace"), "--shutdown").items():
            try:
                values[f"{key}_s"] = float(value)
            except ValueError:
                raise ConfigError(f"--shutdown {key}={value!r} is not a number") from None
        return cls(**values)

    def __str__(self) -> str:
        return f"drain={self.drain_s:g},grace={self.grace_s:g}"


@dataclass(frozen=True)
class FrontWorker:
    """A ``--workers`` process's part in the Envoy front (server/runtime/workers.py): the first
    worker gets ``peers``, the loopback (gRPC, HTTP) ports of the others' control planes, which
    its Envoy sends control requests to along with its own; a ``peer`` is such a control plane
    (it reports the replicas' statistics for the variants Envoy serves, as the first does)."""

    peers: tuple[tuple[int, int], ...] = ()
    peer: bool = False

    @classmethod
    def parse(cls, text: str) -> FrontWorker:
        """``"first=GRPC:HTTP,GRPC:HTTP"`` or ``"peer"``."""
        if text.strip() == "peer":
            return cls(peer=True)
        key, eq, listed = text.partition("=")
        if key.strip() != "first" or not eq:
            raise ConfigError(f"front worker: {text!r} is not first=GRPC:HTTP,... nor peer")
        ports = []
        for item in filter(None, (part.strip() for part in listed.split(","))):
            grpc_port, colon, http_port = item.partition(":")
            try:
                pair = (int(grpc_port), int(http_port)) if colon else None
            except ValueError:
                pair = None
            if pair is None or not all(0 < p < 65536 for p in pair):
                raise ConfigError(f"front worker: {item!r} is not GRPC_PORT:HTTP_PORT")
            ports.append(pair)
        return cls(tuple(ports))

    def __str__(self) -> str:
        if self.peer:
            return "peer"
        return "first=" + ",".join(f"{g}:{h}" for g, h in self.peers) if self.peers else ""


def front_setting(upstream: UpstreamOptions, pools: Mapping[str, str]) -> str:
    """The front the upstream URLs ask for (``?front=``: auto, envoy or python; with precision
    pools, the one their Triton URLs agree on); "" without a Triton upstream."""
    if pools:
        return pools_front(upstream.spec, pools)
    return upstream.settings.front if upstream.scheme in ENVOY_SCHEMES else ""


@dataclass
class ServeOptions:
    """One gateway process: the option groups (server/cli.py builds them from the command line)
    and the lifecycle the process group (server/runtime/options.py) decides."""

    routing: RoutingOptions
    listen: ListenOptions = field(default_factory=ListenOptions)
    limits: LimitsOptions = field(default_factory=LimitsOptions)
    security: SecurityOptions = field(default_factory=SecurityOptions)
    upstream: UpstreamOptions = field(default_factory=UpstreamOptions)
    ready_file: Path | None = None
    # the CLI's default drains for DEFAULT_DRAIN_S; an in-process gateway (tests) stops at once
    shutdown: Shutdown = field(default_factory=lambda: Shutdown(drain_s=0.0))
    # started by ``--workers`` (server/runtime/workers.py): bind the shared ports with SO_REUSEPORT
    # and leave /metrics to the supervisor
    worker: bool = False
    # --workers with the Envoy front: the first worker (the others' control ports) or a peer
    front_worker: FrontWorker = field(default_factory=FrontWorker)

    @property
    def threads(self) -> int:
        return self.upstream.settings.threads


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror or e}") from e


class GatewayServer:
    def __init__(self, options: ServeOptions, upstream: Upstream | None = None) -> None:
        self.options = options
        repository = load_repository(options.routing.repository)
        routing = load_routing(options.routing.routing)
        # this host's speeds before auto ranks (server/routing/retime.py; only embedded is timed)
        up = options.upstream
        upstream_kind = "pools" if routing.pools else up.scheme
        retime_repository(repository, options.routing.retime, upstream_kind, up.settings.threads)
        router = Router(repository, routing)
        if upstream is None:
            if routing.pools:  # precision pools (server/upstreams/pools.py), each URL its settings
                upstream = create_pooled_upstream(
                    up.spec, routing.pools, routing.pool_assignment(repository), repository
                )
            else:
                upstream = create_upstream(up.spec, repository)
        self.gateway = Gateway(
            repository,
            router,
            upstream,
            options.limits.max_request_bytes,
            options.security.auth_token,
            options.security.restricted_api,
        )
        if options.worker:  # a region registered with one worker would be unknown to the others
            self.gateway.shared_memory.refuse = "system shared memory needs --workers 1"
        self.control = ModelControl(self.gateway, options.security.model_control)
        self.router = router
        # Envoy on the public gRPC/HTTP ports, this process behind it on loopback (docs/envoy.md):
        # for Triton upstreams (precision pools: each variant's clusters hold its pool's
        # replicas, server/front/pools.py) unless ``?front=python``
        self.front: EnvoyFront | None = None
        self._weights: asyncio.Task | None = None
        self._slo: EnvoySlo | None = None  # slo models routed in Envoy: their control loop
        self._collector: EnvoyCollector | None = None
        self.pools: PoolPlan | None = None
        if routing.pools:
            self.pools = plan_pools(
                up.spec,
                routing.pools,
                routing.pool_assignment(repository),
                served_variants(repository),
            )
        front = front_setting(up, routing.pools)
        # "auto": Envoy, unless start() finds it missing or a replica that crashes on cancels;
        # of the --workers, the first one runs Envoy (the supervisor gives it the others'
        # control ports), the others are its control planes or, with the Python front, peers
        self._front_setting = front
        self.envoy = front in ("envoy", "auto") and (
            not options.worker or bool(options.front_worker.peers)
        )
        self.ports: dict[str, int] = {}
        self._grpc: grpc.aio.Server | None = None
        self._runners: list[web.AppRunner] = []

    def _tls(self) -> tuple[tuple[bytes, bytes] | None, ssl.SSLContext | None]:
        tls = self.options.listen.tls
        if tls is None:
            return None, None
        cert, key = _read(tls.cert, "TLS certificate"), _read(tls.key, "TLS key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(str(tls.cert), str(tls.key))
        except (ssl.SSLError, OSError) as e:
            raise ConfigError(f"cannot load TLS certificate/key: {e}") from e
        return (cert, key), ctx

    def grpc_payload_limit(self) -> int:
        """``--max-request-bytes``, or less: the models' largest valid request."""
        o = self.options.limits
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
        o, listen, limits = self.options, self.options.listen, self.options.limits
        grpc_tls, http_tls = self._tls()
        await self.gateway.start()
        if o.worker and o.front_worker.peer:  # behind the first worker's Envoy
            self._served_elsewhere(self._front_variants())
        if self.envoy and self._front_setting == "auto":
            self.envoy = await self._auto_front_is_envoy()
        # behind Envoy: loopback, OS-picked ports, plain (Envoy terminates TLS)
        host, grpc_port, http_port = listen.host, listen.grpc_port, listen.http_port
        if self.envoy:
            host, grpc_port, http_port, grpc_tls, http_tls = LOOPBACK, 0, 0, None, None
        try:
            limit = self.grpc_payload_limit()
            calls = limits.grpc_max_concurrent_rpcs
            if calls is None:
                calls = concurrent_rpcs(limit + ENVELOPE_BYTES)
                log.info("gRPC calls in flight limited to %d (--grpc-max-concurrent-rpcs)", calls)
            self._grpc, self.ports["grpc_port"] = await start_grpc_server(
                self.gateway,
                self.control,
                host,
                grpc_port,
                limit,
                grpc_tls,
                o.worker,
                calls,
            )
        except RuntimeError as e:
            raise ConfigError(f"cannot bind gRPC port {listen.host}:{listen.grpc_port}: {e}") from e
        try:
            runner, self.ports["http_port"] = await start_http_server(
                self.gateway,
                self.control,
                host,
                http_port,
                http_tls,
                o.shutdown.grace_s,
                o.worker,
                limits.http,
            )
            self._runners.append(runner)
            if not o.worker:
                port = listen.metrics_port
                await self._serve_metrics(REGISTRY, listen.host, port, "metrics_port")
        except OSError as e:
            raise ConfigError(
                f"cannot bind HTTP/metrics port on {listen.host}: {e.strerror or e}"
            ) from e
        if self.envoy:
            await self._start_envoy(limit + ENVELOPE_BYTES, calls or 0)
        if o.ready_file is not None:
            front = "envoy" if self.envoy else "python"
            doc = {**self.ports, "pid": os.getpid(), "front": front}
            try:
                atomic_write_text(Path(o.ready_file), json.dumps(doc))
            except RepositoryError as e:
                raise ConfigError(f"cannot write --ready-file: {e}") from e
        log.info("precision-serve ready: %s", self.ports)
        return self.ports

    async def _auto_front_is_envoy(self) -> bool:
        """``?front=auto``: the Python front when Envoy is not installed (the ``envoy`` extra),
        or when a reachable replica's tritonserver (< 2.53) can crash on a cancelled call:
        Envoy passes a client's cancellation (or an expired deadline) on to Triton and cannot
        detach it (server/upstreams/triton/detach.py). ``?cancel=propagate`` says cancellations
        are fine; ``?front=envoy`` skips this choice."""
        try:
            envoy_binary()
        except EnvoyError as e:
            log.warning("front=auto: the Python front, not Envoy: %s", e)
            return False
        settings = self.options.upstream.settings
        if settings.cancel_upstream:
            return True
        versions = await self.gateway.upstream.server_versions()
        old = {a: v for a, v in versions.items() if crashes_on_cancel(v)}
        if not old:
            return True
        listed = ", ".join(f"{a} ({v})" for a, v in sorted(old.items()))
        log.warning(
            "front=auto: the Python front, not Envoy: tritonserver < %s can crash when a call is "
            "cancelled, and Envoy passes cancellations on (%s); ?front=envoy or "
            "?cancel=propagate keeps Envoy (docs/envoy.md)",
            ".".join(map(str, CANCEL_FIXED_IN)),
            listed,
        )
        return False

    def front_plan(self, body_limit: int, max_streams: int) -> FrontPlan:
        """What Envoy's configuration is made from (server/front/config.py)."""
        o, up = self.options, self.options.upstream
        repository = self.gateway.repository
        variants = self._front_variants()
        elsewhere: frozenset[str] = frozenset()
        pools = {}
        if self.pools is not None:  # each Triton pool's variants to its replicas
            pools, elsewhere = self.pools.replicas, self.pools.elsewhere
        tls = o.listen.tls
        return FrontPlan(
            host=o.listen.host,
            grpc_port=o.listen.grpc_port,
            http_port=o.listen.http_port,
            control_grpc_port=self.ports["grpc_port"],
            control_http_port=self.ports["http_port"],
            triton=triton_endpoints(up.address),
            variants=variants,
            models=tuple(plan_models(repository, self.router, variants, elsewhere)),
            body_limit=body_limit,
            max_streams=max_streams,
            header_timeout_s=o.limits.http_body_timeout,
            default_timeout_s=up.settings.default_timeout_s,
            token=o.security.auth_token,
            triton_http_port=up.settings.http_port,
            http_body_limit=o.limits.max_request_bytes,
            tls=(tls.cert, tls.key) if tls is not None else None,
            dns=up.scheme == "triton+dns",
            resolve_interval_s=up.settings.resolve_interval_s,
            control_peers=o.front_worker.peers if o.worker else (),
            reuse_port=o.worker,
            pools=pools,
        )

    def _front_variants(self) -> dict[str, str]:
        """The variants Envoy sends to Triton (name -> precision): with precision pools, only
        the Triton pools' ones."""
        variants = served_variants(self.gateway.repository)
        if self.pools is not None:
            variants = {n: p for n, p in variants.items() if n in self.pools.replicas}
        return variants

    def _served_elsewhere(self, variants: Iterable[str]) -> None:
        """Triton has seen what Envoy sent it for ``variants``; this process has not: statistics
        report the replicas' counts for them."""
        upstream = self.gateway.upstream
        if upstream.capabilities.statistics:
            self.gateway.served_elsewhere = (frozenset(variants), upstream.replica_statistics)

    async def _start_envoy(self, body_limit: int, max_streams: int) -> None:
        """Envoy on the public ports in front of Triton and of this process (now on loopback)."""
        plan = self.front_plan(body_limit, max_streams)
        self.front = EnvoyFront(bootstrap(plan))
        self.gateway.shadow_token = plan.shadow_token  # marks the samples Envoy mirrors here
        bound = await self.front.start()
        variants = {v.name: (v.model, v.precision) for v in self.gateway.repository.variants()}
        policies = {name: policy.name for name, policy in self.router.policies.items()}
        self._collector = EnvoyCollector(
            self.front, {n: variants[n] for n in plan.variants}, policies
        )
        self._served_elsewhere(plan.variants)
        if self.options.worker:  # the supervisor's /metrics adds these families (not multiprocess)
            # a worker's Envoy families on a loopback port of their own: a registry holding
            # only the collector
            registry = CollectorRegistry(auto_describe=False)
            registry.register(self._collector)
            await self._serve_metrics(registry, LOOPBACK, 0, "envoy_metrics_port")
        else:
            REGISTRY.register(self._collector)
        splits = [m for m in plan.models if len(m.first) > 1 and not m.slo]
        if splits:
            self._weights = asyncio.create_task(self._follow_readiness(splits))
        policies = self.router.policies
        slo = [
            (m, policy)
            for m in plan.models
            if m.slo and isinstance(policy := policies[m.name], SloPolicy)
        ]
        if slo:  # Envoy's stats feed the controllers, their mixes set the weights
            self._slo = EnvoySlo(self.front, slo, self._ready_precisions)
            self._slo.start()
        self.ports["control_grpc_port"] = self.ports["grpc_port"]
        self.ports["control_http_port"] = self.ports["http_port"]
        self.ports["grpc_port"], self.ports["http_port"] = bound["grpc"], bound["http"]
        self.ports["envoy_admin_port"] = int(self.front.admin_url.rpartition(":")[2])
        log.info("Envoy in front: gRPC %d, HTTP %d", bound["grpc"], bound["http"])

    def _ready_precisions(self, model: str) -> set[str]:
        """The precisions of ``model`` whose variant is ready on some replica."""
        variants = self.gateway.repository.models[model].variants
        return {p for p, v in variants.items() if self.gateway.upstream.ready(v)}

    async def _follow_readiness(self, models: list[ModelPlan]) -> None:
        """Health-driven weights: a split's precision whose variant Triton reports unready on
        every replica (the upstream's readiness checks) gets no first attempts, through Envoy's
        runtime (``/runtime_modify``), until it is ready again."""
        front, upstream = self.front, self.gateway.upstream
        assert front is not None
        repository = self.gateway.repository
        last: dict[str, dict[str, int]] = {}
        while True:
            await asyncio.sleep(READINESS_INTERVAL_S)
            for model in models:
                variants = repository.models[model.name].variants
                ready = {p for p, v in variants.items() if upstream.ready(v)}
                weights = ready_weights(model, ready)
                values = split_runtime(model.name, weights)
                if values != last.get(model.name):
                    try:
                        await asyncio.to_thread(front.set_runtime, values)
                    except (OSError, EnvoyError) as e:  # Envoy restarting: next round
                        log.warning("cannot set %s's split in Envoy: %s", model.name, e)
                        continue
                    last[model.name] = values
                    log.info("Envoy split of %s: %s", model.name, weights)

    async def _serve_metrics(
        self, registry: CollectorRegistry, host: str, port: int, name: str
    ) -> None:
        """``/metrics`` of ``registry`` on ``host:port`` (the bound port: ``self.ports[name]``),
        generated off the event loop: the Envoy collector reads Envoy's admin endpoint at
        scrape time."""

        async def metrics(request: web.Request) -> web.Response:
            body = await asyncio.to_thread(generate_latest, registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._runners.append(runner)
        self.ports[name] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        """Not ready at once; keep serving for the drain delay (a load balancer sees the 503 and
        moves away); then stop accepting, let in-flight requests finish within the grace
        period, close."""
        self.gateway.drain()
        drain_s = self.options.shutdown.drain_s
        if drain_s > 0 and self._runners:
            log.info("precision-serve: not ready; closing in %.1fs", drain_s)
            await asyncio.sleep(drain_s)
        if self._weights is not None:
            self._weights.cancel()
        if self._slo is not None:
            await self._slo.stop()
        if self._collector is not None:
            if not self.options.worker:
                REGISTRY.unregister(self._collector)
            self._collector = None
        if self.front is not None:  # no new requests; those in flight get the grace period
            await self.front.drain(self.options.shutdown.grace_s)
            await self.front.stop()
        tasks = [runner.cleanup() for runner in self._runners]
        if self._grpc is not None:
            tasks.append(self._grpc.stop(self.options.shutdown.grace_s))
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
            options.shutdown.drain_s,
            options.shutdown.grace_s,
        )
    finally:
        await server.stop()
