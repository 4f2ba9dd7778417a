"""The Triton upstream's replica logic against scripted clients (no server): balancing, the one
retry on UNAVAILABLE, marking replicas/variants unready, error mapping, address parsing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from server.catalog import Repository, load_repository
from server.errors import ConfigError, DeadlineExceeded, InvalidInput
from server.upstreams.base import UpstreamSettings, UpstreamUnavailable, create_upstream
from server.upstreams.triton.upstream import TritonUpstream, parse_replicas, unavailable_scope


class _Result:
    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self._outputs = outputs

    def as_numpy(self, name: str) -> np.ndarray:
        return self._outputs[name]


class _Client:
    """Answers health checks as told; ``infer`` raises ``fail`` (a status name) or echoes."""

    def __init__(
        self, tag: float, reachable: bool = True, fail: str | None = None, message: str = ""
    ) -> None:
        self.tag, self.reachable, self.fail = tag, reachable, fail
        self.message = message or f"scripted {fail}"
        self.unready: set[str] = set()
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None

    def _check(self) -> None:
        if not self.reachable:
            raise InferenceServerException("connection refused", status="StatusCode.UNAVAILABLE")

    async def is_server_ready(self, client_timeout: float | None = None) -> bool:
        self._check()
        return not self.unready

    async def is_model_ready(self, name: str, client_timeout: float | None = None) -> bool:
        self._check()
        return name not in self.unready

    async def infer(self, model: str, inputs: list, outputs: list, client_timeout: float) -> Any:
        self.calls.append(model)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise InferenceServerException(self.message, status=f"StatusCode.{self.fail}")
        return _Result({o.name(): np.full((1, 4), self.tag, np.float32) for o in outputs})

    async def close(self) -> None:
        pass


@pytest.fixture
def repository(tiny_repository: Path) -> Repository:
    return load_repository(tiny_repository)


async def _upstream(repository: Repository, *clients: _Client) -> TritonUpstream:
    addresses = ",".join(f"10.0.0.{i}:8001" for i in range(len(clients)))
    upstream = create_upstream(f"triton://{addresses}", repository, UpstreamSettings())
    assert isinstance(upstream, TritonUpstream)
    for replica, client in zip(upstream.replicas, clients, strict=True):
        replica.client = client  # type: ignore[assignment]
    await upstream.check_all()
    return upstream


X = {"x": np.zeros((1, 16), np.float32)}


def test_least_outstanding_replica_is_chosen(repository: Repository) -> None:
    async def scenario() -> None:
        a, b = _Client(1.0), _Client(2.0)
        up = await _upstream(repository, a, b)
        v = repository.variants()[0]
        a.gate = asyncio.Event()  # a's first call hangs: a has 1 outstanding
        pending = asyncio.create_task(up.infer(v, X, None))
        await asyncio.sleep(0)
        for _ in range(4):
            out = await up.infer(v, X, None)
            assert out["logits"][0, 0] == 2.0  # all go to b while a is busy
        a.gate.set()
        await pending
        assert len(a.calls) == 1 and len(b.calls) == 4
        assert up.replicas[0].outstanding == up.replicas[1].outstanding == 0

    asyncio.run(scenario())


class _Recording(_Client):
    """Records whether its (gated) call was cancelled or finished, and the timeout it got."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self.gate = asyncio.Event()
        self.ended: list[str] = []
        self.timeouts: list[float] = []

    async def infer(self, model: str, inputs: list, outputs: list, client_timeout: float) -> Any:
        self.timeouts.append(client_timeout)
        try:
            return await super().infer(model, inputs, outputs, client_timeout)
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise
        finally:
            if not self.ended:
                self.ended.append("finished")


@pytest.mark.parametrize("cancel_upstream", [False, True])
def test_a_cancelled_client_cancels_the_triton_call_only_when_told(
    repository: Repository, cancel_upstream: bool
) -> None:
    """Default (detach): the gateway stops waiting, Triton's call runs to its end (tritonserver
    < 2.53 can crash on cancelled calls); propagate: the call is cancelled."""

    async def scenario() -> None:
        client = _Recording()
        up = await _upstream(repository, client)
        up._settings = UpstreamSettings(cancel_upstream=cancel_upstream)
        v = repository.variants()[0]
        waiter = asyncio.create_task(up.infer(v, X, time.monotonic() + 60))
        while not client.calls:
            await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        client.gate.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert client.ended == (["cancelled"] if cancel_upstream else ["finished"])
        # detached, the call's own timeout is the deadline's remainder plus the slack
        assert client.timeouts[0] > (50 if cancel_upstream else 80)

    asyncio.run(scenario())


def test_a_detached_call_past_its_deadline_is_deadline_exceeded_and_keeps_running(
    repository: Repository,
) -> None:
    async def scenario() -> None:
        client = _Recording()
        up = await _upstream(repository, client)
        v = repository.variants()[0]
        with pytest.raises(DeadlineExceeded, match=f"deadline exceeded while {v.name} ran"):
            await up.infer(v, X, time.monotonic() + 0.05)
        assert client.ended == []  # still running at Triton
        client.gate.set()
        for _ in range(10):
            await asyncio.sleep(0)
        assert client.ended == ["finished"]

    asyncio.run(scenario())


def test_unavailable_is_retried_once_on_another_replica(repository: Repository) -> None:
    async def scenario() -> None:
        dead, alive = _Client(1.0, fail="UNAVAILABLE"), _Client(2.0)
        up = await _upstream(repository, dead, alive)
        v = repository.variants()[0]
        up._rotation = iter([0] * 10)  # type: ignore[assignment]  # start with "dead"
        out = await up.infer(v, X, None)
        assert out["logits"][0, 0] == 2.0 and dead.calls == [v.name]
        assert not up.replicas[0].reachable  # marked at once, not at the next check
        assert up.ready(v)
        labels = {"upstream": "triton://10.0.0.0:8001", "model": v.name}
        assert REGISTRY.get_sample_value("precision_serve_upstream_ready", labels) == 0

    asyncio.run(scenario())


def test_triton_queue_full_retries_elsewhere_and_keeps_the_replica_up(
    repository: Repository,
) -> None:
    async def scenario() -> None:
        busy = _Client(1.0, fail="UNAVAILABLE", message="Exceeds maximum queue size")
        up = await _upstream(repository, busy, _Client(2.0))
        v = repository.variants()[0]
        up._rotation = iter([0] * 10)  # type: ignore[assignment]  # start with "busy"
        out = await up.infer(v, X, None)
        assert out["logits"][0, 0] == 2.0 and busy.calls == [v.name]
        # a full queue is not a dead replica: it keeps serving every variant
        assert up.replicas[0].reachable
        assert all(up.replicas[0].ready_for(w.name) for w in repository.variants())

    asyncio.run(scenario())


def test_triton_model_not_ready_marks_only_that_variant_on_that_replica(
    repository: Repository,
) -> None:
    async def scenario() -> None:
        v, other = repository.variants()[:2]
        unloaded = _Client(
            1.0,
            fail="UNAVAILABLE",
            message=f"Request for unknown model: '{v.name}' has no available versions",
        )
        up = await _upstream(repository, unloaded, _Client(2.0))
        up._rotation = iter([0] * 10)  # type: ignore[assignment]  # start with "unloaded"
        assert (await up.infer(v, X, None))["logits"][0, 0] == 2.0
        assert up.replicas[0].reachable and not up.replicas[0].ready_for(v.name)
        assert up.replicas[0].ready_for(other.name)
        labels = {"upstream": "triton://10.0.0.0:8001", "model": other.name}
        assert REGISTRY.get_sample_value("precision_serve_upstream_ready", labels) == 1

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "message, scope",
    [
        ("Exceeds maximum queue size", "queue"),
        ("Request for unknown model: 'm' has no available versions", "variant"),
        ("failed to connect to all addresses; last error: Connection refused", "replica"),
        ("Model version not ready", "variant"),
        ("Server not ready", "replica"),
        ("Socket closed", "replica"),
        ("", "replica"),
    ],
)
def test_unavailable_scope(message: str, scope: str) -> None:
    assert unavailable_scope(message) == scope


def test_no_replica_left_raises_upstream_unavailable(repository: Repository) -> None:
    async def scenario() -> None:
        a, b = _Client(1.0, fail="UNAVAILABLE"), _Client(2.0, fail="UNAVAILABLE")
        up = await _upstream(repository, a, b)
        v = repository.variants()[0]
        with pytest.raises(UpstreamUnavailable, match="failed"):
            await up.infer(v, X, None)
        assert len(a.calls) + len(b.calls) == 2  # exactly one retry
        with pytest.raises(UpstreamUnavailable, match="not ready on any Triton replica"):
            await up.infer(v, X, None)

    asyncio.run(scenario())


def test_a_variant_unloaded_on_one_replica_only_moves_that_variant(
    repository: Repository,
) -> None:
    async def scenario() -> None:
        a, b = _Client(1.0), _Client(2.0)
        v, other = repository.variants()[:2]
        a.unready.add(v.name)
        up = await _upstream(repository, a, b)
        assert up.replicas[0].reachable and not up.replicas[0].ready_for(v.name)
        assert up.replicas[0].ready_for(other.name)
        for _ in range(3):
            assert (await up.infer(v, X, None))["logits"][0, 0] == 2.0
        b.unready.add(v.name)
        await up.check_all()
        assert not up.ready(v) and up.ready(other)

    asyncio.run(scenario())


def test_client_errors_are_not_retried(repository: Repository) -> None:
    async def scenario() -> None:
        a, b = _Client(1.0, fail="INVALID_ARGUMENT"), _Client(2.0, fail="INVALID_ARGUMENT")
        up = await _upstream(repository, a, b)
        with pytest.raises(InvalidInput):
            await up.infer(repository.variants()[0], X, None)
        assert len(a.calls) + len(b.calls) == 1

    asyncio.run(scenario())


def test_unreachable_replica_reports_every_variant_unready(repository: Repository) -> None:
    async def scenario() -> None:
        up = await _upstream(repository, _Client(1.0, reachable=False), _Client(2.0))
        assert up.replicas[0].problem and "UNAVAILABLE" in up.replicas[0].problem
        for v in repository.variants():
            assert up.ready(v) and not up.replicas[0].ready_for(v.name)
            labels = {"upstream": "triton://10.0.0.0:8001", "model": v.name}
            assert REGISTRY.get_sample_value("precision_serve_upstream_ready", labels) == 0

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "address, problem",
    [("h1", "not HOST:PORT"), ("h1:x", "not HOST:PORT"), ("h:1,h:1", "twice"), (" , ", "at least")],
)
def test_bad_addresses_are_config_errors(address: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        parse_replicas(address)


def test_addresses_parse() -> None:
    assert parse_replicas("h1:8001, 10.0.0.2:9001") == ["h1:8001", "10.0.0.2:9001"]
