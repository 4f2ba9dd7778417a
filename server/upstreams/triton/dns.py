"""Replicas discovered by DNS: ``--upstream triton+dns://NAME:PORT[?interval=S]``.

NAME is typically a Kubernetes headless Service (one A/AAAA record per ready pod). It is resolved at
start and then every ``interval`` seconds (URL ``?interval=``, else
``UpstreamSettings.resolve_interval_s``); each answer becomes the replica set of a
:class:`~server.upstreams.triton.upstream.TritonUpstream` (``set_replicas``): new addresses are
opened and checked, then balanced like any replica; a vanished address takes no new calls and its
channels close when its in-flight calls have finished. A failed resolution keeps the last answer (a
DNS hiccup must not empty the pool; replicas that are really gone fail their readiness checks).

The resolver is injectable (:class:`Resolver`): tests answer with loopback addresses
(127.0.0.2, 127.0.0.3, ... on one port).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol
from urllib.parse import parse_qs

from server.catalog import Repository, Variant
from server.errors import ConfigError
from server.upstreams.base import UpstreamSettings
from server.upstreams.triton.upstream import TritonUpstream

log = logging.getLogger(__name__)


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[str]:
        """``host`` -> its addresses, as ``"IP"`` strings (IPv6 without brackets)."""
        ...


class DnsResolver:
    """The system resolver through ``loop.getaddrinfo`` (A and AAAA records)."""

    async def resolve(self, host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return sorted({str(info[4][0]) for info in infos})


def parse_dns_address(address: str, default_interval: float) -> tuple[str, int, float]:
    """``"NAME:PORT?interval=2"`` -> ("NAME", PORT, 2.0); ConfigError when malformed."""
    target, _, query = address.partition("?")
    host, sep, port = target.strip().rpartition(":")
    if not sep or not host or "," in host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"triton+dns upstream {address!r} is not NAME:PORT[?interval=S]")
    interval = default_interval
    params = parse_qs(query, strict_parsing=False) if query else {}
    unknown = sorted(set(params) - {"interval"})
    if unknown:
        raise ConfigError(f"triton+dns upstream {address!r}: unknown option(s) {unknown}")
    if "interval" in params:
        try:
            interval = float(params["interval"][-1])
        except ValueError:
            raise ConfigError(
                f"triton+dns upstream {address!r}: interval is not a number"
            ) from None
    if not interval > 0:
        raise ConfigError(f"triton+dns upstream {address!r}: interval must be > 0")
    return host.strip("[]"), int(port), interval


def join_host_port(ip: str, port: int) -> str:
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(ip).version == 6:
            return f"[{ip}]:{port}"
    return f"{ip}:{port}"


class Discovery:
    """Resolve ``host`` every ``interval`` seconds and hand each answer to ``apply``."""

    def __init__(
        self,
        resolver: Resolver,
        host: str,
        port: int,
        interval: float,
        apply: Callable[[list[str]], Awaitable[object]],
    ) -> None:
        self.resolver, self.host, self.port, self.interval = resolver, host, port, interval
        self._apply = apply
        self.resolutions = 0  # answers applied (tests count intervals with it)
        self.last: list[str] | None = None  # the last answer, "IP:PORT" sorted
        self.problem: str | None = None  # why the last resolution failed
        self._task: asyncio.Task | None = None

    async def refresh(self) -> list[str] | None:
        """Resolve once and apply the answer; on failure keep the last one (and say why)."""
        try:
            ips = await self.resolver.resolve(self.host, self.port)
        except (TimeoutError, OSError) as e:
            if self.problem is None:
                log.warning("cannot resolve %s (keeping %s): %s", self.host, self.last, e)
            self.problem = f"cannot resolve {self.host}: {e}"
            return None
        self.problem = None
        addresses = sorted({join_host_port(ip, self.port) for ip in ips})
        await self._apply(addresses)
        self.last = addresses
        self.resolutions += 1
        return addresses

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.refresh()
            except Exception:  # never let discovery die
                log.exception("replica discovery for %s failed", self.host)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"discovery-{self.host}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


class DnsTritonUpstream(TritonUpstream):
    """A :class:`TritonUpstream` whose replicas are the addresses NAME resolves to."""

    name = "triton+dns"

    def __init__(
        self,
        address: str,
        repository: Repository,
        settings: UpstreamSettings,
        resolver: Resolver | None = None,
    ) -> None:
        host, port, interval = parse_dns_address(address, settings.resolve_interval_s)
        super().__init__(address, repository, settings)
        self.discovery = Discovery(
            resolver or DnsResolver(), host, port, interval, self.set_replicas
        )

    def _initial_replicas(self, address: str) -> list[str]:
        return []  # resolved in start()

    async def start(self) -> None:
        await super().start()
        await self.discovery.refresh()
        self.discovery.start()

    async def close(self) -> None:
        await self.discovery.close()
        await super().close()

    def _unready_reason(self, variant: Variant) -> str:
        reason = super()._unready_reason(variant)
        if self.discovery.problem:
            reason += f"; {self.discovery.problem}"
        elif not self.replicas:
            reason += f"; {self.discovery.host} resolved to no address"
        return reason


__all__ = [
    "Discovery",
    "DnsResolver",
    "DnsTritonUpstream",
    "Resolver",
    "join_host_port",
    "parse_dns_address",
]
