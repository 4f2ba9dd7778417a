"""Shadow samples the Envoy front mirrors to the control plane (Gateway.shadow_sample): run on the
served precision and the reference, compared with the Python path's code and metrics, never
counted as client requests, at most MAX_SHADOW_TASKS at once (the rest dropped, counted).

The upstream is a stand-in whose answers are known (served: the inputs; reference: the inputs
with the first column raised, so row by row agreement is known) and whose calls can be held."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from server.catalog import Repository, Variant, load_repository
from server.dataplane.gateway import MAX_SHADOW_TASKS, Gateway, InferRequest
from server.dataplane.tensors import WireTensor
from server.errors import InvalidInput
from server.routing.policies import Router, parse_routing
from server.upstreams.base import Capabilities, UpstreamBase

SHADOW = {
    "models": {"tiny": {"policy": "shadow", "precision": "int8", "shadow": {"reference": "fp32"}}}
}
TOKEN = "0123abcd"
X = np.array([[5.0] + [0.0] * 15, [0.0, 3.0] + [0.0] * 14], np.float32)  # argmax 0 and 1


class Stand(UpstreamBase):
    """Answers ``logits`` = the input (fp32: first column + 4, so row 1's argmax moves to 0)."""

    name = "stand"
    capabilities = Capabilities(honours_deadline=True)

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.hold = asyncio.Event()
        self.hold.set()
        self.unready: set[str] = set()
        self.failing: set[str] = set()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def ready(self, variant: Variant) -> bool:
        return variant.name not in self.unready

    async def infer(
        self, variant: Variant, inputs: dict[str, np.ndarray], deadline: float | None
    ) -> dict[str, np.ndarray]:
        self.calls.append(variant.precision)
        await self.hold.wait()
        if variant.name in self.failing:
            raise RuntimeError(f"{variant.name} failed")
        out = inputs["x"].copy()
        if variant.precision == "fp32":
            out[:, 0] += 4.0
        return {"logits": out}


@pytest.fixture(scope="module")
def repository(tiny_repository: Path) -> Repository:
    return load_repository(tiny_repository)


def _gateway(repository: Repository, routing: dict = SHADOW) -> tuple[Gateway, Stand]:
    upstream = Stand()
    gateway = Gateway(repository, Router(repository, parse_routing(routing)), upstream)
    gateway.shadow_token = TOKEN
    return gateway, upstream


def _request(model: str = "tiny", x: np.ndarray = X) -> InferRequest:
    tensor = WireTensor("x", "FP32", list(x.shape), raw=x.tobytes())
    return InferRequest(model=model, inputs=[tensor])


def _parsed(request: InferRequest):  # type: ignore[no-untyped-def]
    async def parse() -> InferRequest:
        return request

    return parse


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _compared(agree: str) -> float:
    return _value(
        "precision_serve_shadow_comparisons_total",
        model="tiny",
        precision="int8",
        reference="fp32",
        top1_agree=agree,
    )


def _dropped(reason: str, model: str = "tiny") -> float:
    return _value("precision_serve_shadow_dropped_total", model=model, reason=reason)


def _client_series() -> float:
    """Everything the gateway counts of client requests to tiny."""
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name in (
            "precision_serve_requests",
            "precision_serve_routing_decisions",
            "precision_serve_request_duration_seconds",
        ):
            total += sum(
                s.value
                for s in metric.samples
                if s.labels.get("model") == "tiny" and not s.name.endswith("_created")
            )
    return total


async def _settle(gateway: Gateway) -> None:
    while gateway._shadow_tasks:
        await asyncio.sleep(0.01)


def test_only_the_fronts_token_marks_a_sample(repository: Repository) -> None:
    gateway, _ = _gateway(repository)
    assert gateway.is_shadow(TOKEN)
    assert not gateway.is_shadow("nope") and not gateway.is_shadow(None)
    gateway.shadow_token = None  # the Python front: no request is a sample
    assert not gateway.is_shadow(TOKEN)


def test_a_sample_runs_both_precisions_and_records_agreement_not_a_request(
    repository: Repository,
) -> None:
    gateway, upstream = _gateway(repository)
    agree, disagree, clients = _compared("true"), _compared("false"), _client_series()

    async def run() -> None:
        await gateway.shadow_sample("tiny", _parsed(_request()))
        await _settle(gateway)

    asyncio.run(run())
    assert sorted(upstream.calls) == ["fp32", "int8"]  # the served precision runs once more
    # row 0 agrees (argmax 0 in both), row 1 does not (1 vs 0): one comparison per row
    assert (_compared("true") - agree, _compared("false") - disagree) == (1, 1)
    assert _client_series() == clients  # no request, latency or routing decision counted


def test_samples_beyond_the_limit_are_dropped_and_none_is_waited_for(
    repository: Repository,
) -> None:
    gateway, upstream = _gateway(repository)
    busy, agree = _dropped("busy"), _compared("true")
    upstream.hold.clear()  # every upstream call waits: the comparisons stay in flight

    async def run() -> None:
        parsed = []

        async def parse() -> InferRequest:
            parsed.append(1)
            return _request()

        for _ in range(MAX_SHADOW_TASKS + 5):  # each handed over at once, however slow Triton
            await asyncio.wait_for(gateway.shadow_sample("tiny", parse), 1)
        await asyncio.sleep(0.05)
        assert len(gateway._shadow_tasks) == MAX_SHADOW_TASKS
        assert _dropped("busy") - busy == 5
        assert len(parsed) == MAX_SHADOW_TASKS  # a sample dropped is not even decoded
        upstream.hold.set()
        await _settle(gateway)

    asyncio.run(run())
    assert _compared("true") - agree == MAX_SHADOW_TASKS


def test_a_failing_or_unready_reference_is_counted_and_compares_nothing(
    repository: Repository,
) -> None:
    gateway, upstream = _gateway(repository)
    before = {r: _dropped(r) for r in ("failed", "unready", "invalid")}
    compared = _compared("true") + _compared("false")

    unknown = _dropped("invalid", "unknown")

    async def run() -> None:
        upstream.failing.add("tiny_fp32")
        await gateway.shadow_sample("tiny", _parsed(_request()))
        await _settle(gateway)
        upstream.failing.clear()
        upstream.unready.add("tiny_fp32")
        await gateway.shadow_sample("tiny", _parsed(_request()))
        await _settle(gateway)
        upstream.unready.clear()
        # what the served variant refuses (a wrong shape), and a body that did not parse
        await gateway.shadow_sample("tiny", _parsed(_request(x=np.zeros((1, 7), np.float32))))

        async def broken() -> InferRequest:
            raise InvalidInput("malformed ModelInferRequest")

        await gateway.shadow_sample("tiny", broken)
        # no model name in the body, an unknown model
        await gateway.shadow_sample(None, broken)
        await gateway.shadow_sample("nope", _parsed(_request("nope")))

    asyncio.run(run())
    after = {r: _dropped(r) for r in before}
    assert {r: after[r] - before[r] for r in before} == {"failed": 1, "unready": 1, "invalid": 2}
    assert _dropped("invalid", "unknown") - unknown == 2
    assert _compared("true") + _compared("false") == compared


def test_a_model_without_the_shadow_policy_is_not_sampled(repository: Repository) -> None:
    gateway, upstream = _gateway(repository, {"models": {"tiny": {"policy": "fixed"}}})
    invalid = _dropped("invalid")

    async def run() -> None:
        await gateway.shadow_sample("tiny", _parsed(_request()))
        await _settle(gateway)

    asyncio.run(run())
    assert upstream.calls == [] and _dropped("invalid") - invalid == 1
