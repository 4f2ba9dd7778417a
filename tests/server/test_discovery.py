"""Replica discovery (server/upstreams/triton/dns.py) with a fake resolver: no Triton, no sleeps."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.catalog import load_repository
from server.errors import ConfigError
from server.upstreams import create_upstream
from server.upstreams.base import UpstreamSettings
from server.upstreams.triton.dns import Discovery, DnsTritonUpstream, parse_dns_address


class FakeResolver:
    def __init__(self, *answers: list[str] | Exception) -> None:
        self.answers = list(answers)
        self.calls = 0
        self.called = asyncio.Event()

    async def resolve(self, host: str, port: int) -> list[str]:
        self.calls += 1
        self.called.set()
        answer = self.answers[min(self.calls - 1, len(self.answers) - 1)]
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_address_and_interval_are_parsed() -> None:
    assert parse_dns_address("triton-cpu:8001", 5.0) == ("triton-cpu", 8001, 5.0)
    assert parse_dns_address("triton-cpu:8001?interval=0.5", 5.0) == ("triton-cpu", 8001, 0.5)
    for bad in ("triton-cpu", "a:b", "h:8001?interval=0", "h:8001?every=2", "a:1,b:1"):
        with pytest.raises(ConfigError):
            parse_dns_address(bad, 5.0)


def test_each_answer_is_applied_and_a_failure_keeps_the_last() -> None:
    applied: list[list[str]] = []

    async def apply(addresses: list[str]) -> None:
        applied.append(addresses)

    async def run() -> Discovery:
        resolver = FakeResolver(
            ["127.0.0.3", "127.0.0.2"], OSError("NXDOMAIN"), ["127.0.0.2", "::1"]
        )
        d = Discovery(resolver, "svc", 8001, 1.0, apply)
        assert await d.refresh() == ["127.0.0.2:8001", "127.0.0.3:8001"]
        assert await d.refresh() is None
        assert d.problem and "NXDOMAIN" in d.problem and d.last == applied[-1]
        assert await d.refresh() == ["127.0.0.2:8001", "[::1]:8001"]
        assert d.problem is None
        return d

    d = asyncio.run(run())
    assert applied == [["127.0.0.2:8001", "127.0.0.3:8001"], ["127.0.0.2:8001", "[::1]:8001"]]
    assert d.resolutions == 2


def test_the_loop_keeps_resolving_until_closed() -> None:
    async def run() -> int:
        resolver = FakeResolver(["127.0.0.2"])
        seen: list[list[str]] = []

        async def apply(addresses: list[str]) -> None:
            seen.append(addresses)
            if len(seen) >= 3:
                done.set()

        done = asyncio.Event()
        d = Discovery(resolver, "svc", 1, 0.01, apply)
        d.start()
        await asyncio.wait_for(done.wait(), 10)
        await d.close()
        calls = resolver.calls
        await asyncio.sleep(0.05)  # closed: no further resolution happens
        assert resolver.calls == calls
        return len(seen)

    assert asyncio.run(run()) >= 3


def test_replicas_join_and_leave_and_a_busy_one_closes_at_its_last_call(
    tiny_repository: Path,
) -> None:
    repo = load_repository(tiny_repository)

    async def run() -> None:
        resolver = FakeResolver(["127.0.0.2", "127.0.0.3"])
        up = create_upstream("triton+dns://svc:1?interval=60", repo, UpstreamSettings())
        assert isinstance(up, DnsTritonUpstream) and up.discovery.interval == 60
        up.discovery.resolver = resolver
        await up.start()  # nothing listens on port 1: every replica is unready, none raises
        try:
            assert [r.address for r in up.replicas] == ["127.0.0.2:1", "127.0.0.3:1"]
            variant = next(iter(repo.variants()))
            assert not up.ready(variant)
            busy = up.replicas[0]
            busy.outstanding = 1  # a call in flight
            resolver.answers = [["127.0.0.3", "127.0.0.4"]]
            await up.discovery.refresh()
            assert [r.address for r in up.replicas] == ["127.0.0.3:1", "127.0.0.4:1"]
            assert busy.leaving and busy.channel is not None  # still open for its call
            up._release(busy)  # the call ends
            assert busy.channel is None and busy.client is None
            idle = up.replicas[0]
            resolver.answers = [["127.0.0.4"]]
            await up.discovery.refresh()
            assert idle.leaving and idle.channel is None  # nothing in flight: closed at once
        finally:
            await up.close()

    asyncio.run(run())
