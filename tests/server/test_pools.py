"""Precision pools: the routing file's ``pools`` / ``precision_pools`` and the composite upstream
that dispatches each variant to its pool (fake pool upstreams; Triton pools are in
tests/triton/test_discovery_pools.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from server.catalog import Variant, load_repository
from server.errors import ConfigError
from server.routing.policies import Router, parse_routing
from server.upstreams.base import UpstreamBase, UpstreamUnavailable
from server.upstreams.pools import PooledUpstream

ROUTING = {
    "pools": {"cpu": "triton+dns://triton-cpu:8001", "gpu": "triton://gpu:8001"},
    "defaults": {"precision_pools": {"INT8": "cpu"}},
    "models": {"tiny": {"precision_pools": {"int8": "cpu", "fp32": "gpu"}}},
}


class FakePool(UpstreamBase):
    def __init__(self, name: str, up: bool = True) -> None:
        self.name, self.up, self.served = name, up, []
        self.started = self.closed = False

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    def ready(self, variant: Variant) -> bool:
        return self.up

    async def infer(self, variant, inputs, deadline):  # type: ignore[no-untyped-def]
        if not self.up:
            raise UpstreamUnavailable(f"{self.name} is down")
        self.served.append(variant.precision)
        return {"logits": np.zeros((1, 4), np.float32)}


def test_routing_file_maps_precisions_to_pools(tiny_repository: Path) -> None:
    repo = load_repository(tiny_repository)
    config = parse_routing(ROUTING)
    assert config.pools == ROUTING["pools"]
    assert config.pool_assignment(repo) == {"tiny_int8": "cpu", "tiny_fp32": "gpu"}
    with pytest.raises(ConfigError, match=r"unknown pool.*tpu"):
        parse_routing(
            {"pools": {"cpu": "embedded"}, "models": {"x": {"precision_pools": {"int8": "tpu"}}}}
        )


def test_each_variant_goes_to_its_pool_and_fallback_crosses_pools(tiny_repository: Path) -> None:
    from server.dataplane.gateway import Gateway, InferRequest
    from server.dataplane.tensors import WireTensor

    repo = load_repository(tiny_repository)
    config = parse_routing(ROUTING)
    cpu, gpu, rest = FakePool("cpu"), FakePool("gpu"), FakePool("default")
    pooled = PooledUpstream({"cpu": cpu, "gpu": gpu}, rest, config.pool_assignment(repo))
    assert not pooled.capabilities.forward  # fakes declare no pass-through
    gw = Gateway(repo, Router(repo, config), pooled, 1 << 20, None)
    x = np.zeros((1, 16), np.float32)

    def request(model: str, **parameters: str) -> InferRequest:
        tensor = WireTensor("x", "FP32", [1, 16], raw=x.tobytes())
        return InferRequest(model=model, inputs=[tensor], parameters=parameters)

    async def run() -> list[str]:
        await gw.start()
        assert cpu.started and gpu.started and rest.started
        served = []
        for precision in ("int8", "fp16", "fp32"):
            served.append((await gw.infer(request(f"tiny_{precision}"))).precision)
        cpu.up = False  # the int8 pool is down: int8 -> fp16 (default pool)
        response = await gw.infer(request("tiny", precision="int8"))
        assert response.fallback_from == "int8"
        served.append(response.precision)
        await gw.close()
        return served

    assert asyncio.run(run()) == ["int8", "fp16", "fp32", "fp16"]
    assert cpu.served == ["int8"] and gpu.served == ["fp32"] and rest.served == ["fp16", "fp16"]
    assert cpu.closed and gpu.closed and rest.closed
