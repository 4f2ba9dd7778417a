"""Real Triton replicas found by (injected) DNS, and precision pools across Triton servers.

Tritons listen on 127.0.0.2, 127.0.0.3, ... on one gRPC port (all of 127.0.0.0/8 is loopback on
Linux), as the pods behind a headless Service would; the test's resolver answers with those
addresses. Intervals are counted in resolutions (``Discovery.resolutions``), not wall time."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from common.model_repository import load_manifests
from common.process import wait_ready
from server.app import ServeOptions
from server.catalog import load_repository
from server.routing.options import RoutingOptions
from server.runtime.runner import GatewayProcess, InProcessGateway
from server.transports.options import ListenOptions, Ports
from server.upstreams.base import UpstreamSettings
from server.upstreams.triton.dns import DnsTritonUpstream
from tests.triton.conftest import StartTriton
from tests.triton.load import Load, successes

pytestmark = [pytest.mark.integration, pytest.mark.slow]

INTERVAL_S = 1.0


class ListResolver:
    """Answers with whatever ``ips`` holds now."""

    def __init__(self, ips: list[str]) -> None:
        self.ips = list(ips)

    async def resolve(self, host: str, port: int) -> list[str]:
        return list(self.ips)


def _shared_port(hosts: list[str]) -> int:
    for _ in range(20):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = s.getsockname()[1]
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise AssertionError("no port free on every loopback address")


def test_replicas_join_leave_and_a_dead_address_is_skipped_under_load(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    model = load_manifests(tiny_repository)["tiny"].variants["fp32"].triton_name
    a_ip, b_ip, c_ip, dead_ip = "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"
    port = _shared_port([a_ip, b_ip, c_ip, dead_ip])
    a, b, c = (start_triton(tiny_repository, host=ip, grpc_port=port) for ip in (a_ip, b_ip, c_ip))
    resolver = ListResolver([a_ip, b_ip, dead_ip])
    upstream = DnsTritonUpstream(
        f"triton-test:{port}?interval={INTERVAL_S}",
        load_repository(tiny_repository),
        UpstreamSettings(),
        resolver=resolver,
    )
    options = ServeOptions(
        RoutingOptions(tiny_repository), listen=ListenOptions(ports=Ports(0, 0, 0))
    )
    with (
        InProcessGateway(options, upstream=upstream) as gw,
        Load(gw.grpc_url, model, {"x": np.ones((1, 16), np.float32)}, clients=2) as load,
    ):
        dead = next(r for r in upstream.replicas if r.address == f"{dead_ip}:{port}")
        assert not dead.reachable and dead.problem  # resolved, nothing listening: unready
        wait_ready(lambda: len(load.calls) >= 100, 60, "steady load")
        # (each Triton may have served a request of its own at start-up: compare with that)
        assert successes(a.grpc_url, model) > 1 and successes(b.grpc_url, model) > 1
        c_before = successes(c.grpc_url, model)

        # a third replica appears in the answer
        before = upstream.discovery.resolutions
        resolver.ips = [a_ip, b_ip, c_ip, dead_ip]
        wait_ready(
            lambda: successes(c.grpc_url, model) > c_before, 30, "traffic on the new replica"
        )
        assert upstream.discovery.resolutions - before <= 2

        # a replica leaves the answer: it finishes what it has and takes nothing new
        resolver.ips = [b_ip, c_ip, dead_ip]
        gone = next(r for r in upstream.replicas if r.address == f"{a_ip}:{port}")
        wait_ready(lambda: gone.leaving and gone.channel is None, 30, "replica a closed")
        served_a = successes(a.grpc_url, model)
        n = len(load.calls)
        wait_ready(lambda: len(load.calls) >= n + 100, 60, "traffic after the removal")
        assert successes(a.grpc_url, model) == served_a
        assert not any(r.address == dead.address and r.reachable for r in upstream.replicas)
    failed = [call for call in load.calls if call[2] is not None]
    print(f"discovery: {len(load.calls)} calls, {len(failed)} failed")
    assert not failed, failed[:3]


def test_one_logical_model_spans_two_pools_and_falls_back_across_them(
    tiny_repository: Path, start_triton: StartTriton, tmp_path: Path
) -> None:
    variants = load_manifests(tiny_repository)["tiny"].variants
    cpu = start_triton(tiny_repository)
    gpu = start_triton(tiny_repository)
    routing = tmp_path / "routing.yaml"
    routing.write_text(
        yaml.safe_dump(
            {
                # the Python front (the Envoy front: tests/triton/test_envoy_pools.py)
                "pools": {
                    "cpu": f"triton://{cpu.grpc_url}?front=python",
                    # the real resolver: localhost -> 127.0.0.1 (and ::1, unready: skipped)
                    "gpu": f"triton+dns://localhost:{gpu.grpc_port}?interval=1&front=python",
                },
                "models": {
                    "tiny": {"precision_pools": {"int8": "cpu", "fp16": "gpu", "fp32": "gpu"}}
                },
            }
        )
    )
    x = grpcclient.InferInput("x", [2, 16], "FP32")
    x.set_data_from_numpy(np.ones((2, 16), np.float32))

    def served(client: grpcclient.InferenceServerClient, precision: str) -> str:
        result = client.infer("tiny", [x], parameters={"precision": precision}, client_timeout=30)
        return result.get_response().parameters["precision"].string_param

    name = {p: v.triton_name for p, v in variants.items()}

    def counts() -> dict[tuple[str, str], int]:
        return {
            (pool, p): successes(t.grpc_url, name[p])
            for pool, t in (("cpu", cpu), ("gpu", gpu))
            for p in name
        }

    with GatewayProcess(tiny_repository, extra_args=["--routing", str(routing)]) as gw:
        assert "envoy_admin_port" not in gw.ports  # the gateway forwards itself
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        before = counts()  # (Triton's own start-up may have run some)
        assert [served(client, p) for p in ("int8", "fp16", "fp32")] == ["int8", "fp16", "fp32"]
        after = counts()
        delta = {k: after[k] - before[k] for k in after}
        assert delta == {
            ("cpu", "int8"): 1,
            ("cpu", "fp16"): 0,
            ("cpu", "fp32"): 0,
            ("gpu", "int8"): 0,
            ("gpu", "fp16"): 1,
            ("gpu", "fp32"): 1,
        }

        cpu.kill()  # the int8 pool is down: int8 falls back to fp16 in the other pool
        wait_ready(lambda: not client.is_model_ready(name["int8"]), 15, "int8 unready")
        assert served(client, "int8") == "fp16"
        assert successes(gpu.grpc_url, name["fp16"]) == after[("gpu", "fp16")] + 1
        client.close()
