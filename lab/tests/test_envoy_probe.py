"""lab.envoy_probe: every variant's configuration is one the real Envoy accepts, and the Lua
rewrite (upstream and downstream) makes the upstream see the appended ``model_name`` - checked
through a real Envoy against a loopback gRPC server that answers with the name it parsed."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from lab import envoy_probe as ep


@pytest.fixture
def name_echo() -> Iterator[int]:
    """A gRPC server answering ModelInfer with the request's parsed model_name and input size."""

    def infer(data: bytes, context: object) -> bytes:
        req = service_pb2.ModelInferRequest.FromString(data)
        resp = service_pb2.ModelInferResponse(model_name=req.model_name, id=str(len(data)))
        return resp.SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(2),
        options=[("grpc.max_receive_message_length", 8 * 1024 * 1024)],
    )
    server.add_generic_rpc_handlers([handler])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(grace=None)


def _call(url: str, payload: bytes) -> service_pb2.ModelInferResponse:
    options = [("grpc.max_send_message_length", 8 * 1024 * 1024)]
    with grpc.insecure_channel(url, options=options) as channel:
        call = channel.unary_unary(ep.METHOD, request_serializer=None, response_deserializer=None)
        return service_pb2.ModelInferResponse.FromString(call(payload, timeout=10))


@pytest.mark.parametrize("name", sorted(ep.VARIANTS))
def test_every_variant_config_is_valid_for_envoy(name: str, tmp_path: Path) -> None:
    config = ep.envoy_config(ep.VARIANTS[name], 8001, "digits_int8")
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    done = subprocess.run(
        [str(ep.envoy_binary()), "--mode", "validate", "--config-path", str(path),
         "--disable-hot-restart", "--log-level", "error"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    cluster = json.loads(path.read_text())["static_resources"]["clusters"][0]
    assert (
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
            "socket_address"
        ]["port_value"]
        == 8001
    )


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["w1", "w1-lua", "w1-lua-down", "w1-select-lua-reply"])
def test_rewrite_reaches_the_upstream(variant: str, name_echo: int, tmp_path: Path) -> None:
    """A rewriting variant turns the logical name into the real one, whatever the body's size
    (one DATA frame or many) or the name's length (a two-byte length varint); ``w1`` does not.
    A ``reply`` variant adds the ``precision`` response parameter; a ``select`` variant's route
    matches only once its downstream Lua has read the body and set the header."""
    v = ep.VARIANTS[variant]
    real = "m" * 200  # > 127 bytes: its length takes two varint bytes
    with ep.EnvoyProcess(v, ep.envoy_config(v, name_echo, real), tmp_path) as envoy:
        for pixels in (1, 300):  # 4 KB and 1.2 MB of raw input
            image = np.zeros((1, 1, 32, 32 * pixels), dtype=np.float32)
            payload = ep.request_bytes(ep.LOGICAL_NAME, image)
            resp = _call(envoy.grpc_url, payload)
            assert resp.model_name == (real if v.rewrites else ep.LOGICAL_NAME)
            added = len(real) + 3 if v.rewrites else 0  # tag, two length bytes, the name
            assert int(resp.id) == len(payload) + added
            want = {"precision": ep.REPLY_PRECISION} if v.reply else {}
            assert {k: p.string_param for k, p in resp.parameters.items()} == want


def test_summary_pairs_each_path_with_triton_of_the_same_round() -> None:
    def m(rps: float, p50: float, cpu: float | None) -> dict:
        sys_ms = None if cpu is None else cpu / 2
        return {"rps": rps, "p50_ms": p50, "proxy_cpu_ms": cpu, "proxy_sys_ms": sys_ms,
                "triton_cpu_ms": 0.5, "client_cpu_ms": 0.3}  # fmt: skip

    rounds = [
        {"triton": {"1": m(100, 1.0, None)}, "gateway": {"1": m(50, 2.0, 1.0)},
         "w1": {"1": m(80, 1.5, 0.2)}},
        {"triton": {"1": m(200, 0.5, None)}, "gateway": {"1": m(100, 1.0, 0.8)},
         "w1": {"1": m(180, 0.75, 0.4)}},
    ]  # fmt: skip
    s = ep.summarise(rounds, ["triton", "gateway", "w1"], [1])["w1"]["1"]
    assert s["x_triton"] == pytest.approx({"median": 0.85, "min": 0.8, "max": 0.9})
    assert s["p50_added_ms"] == pytest.approx({"median": 0.375, "min": 0.25, "max": 0.5})
    assert s["cpu_x_gateway"] == pytest.approx({"median": 0.35, "min": 0.2, "max": 0.5})
