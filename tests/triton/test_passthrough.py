"""Pass-through to Triton: the gateway forwards ModelInfer as the client's bytes (variant name
appended) and returns Triton's reply bytes with the precision parameter appended."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from common.model_repository import load_manifests
from loadtest import promtext
from server.runtime.runner import GatewayProcess
from server.transports.grpc.service import _precision_parameter
from server.upstreams.triton.upstream import model_name_field
from tests.triton.conftest import StartTriton

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def _request(model: str, x: np.ndarray, **params: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id="req-1")
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    for k, v in params.items():
        req.parameters[k].string_param = v
    return req


def _call(url: str, req: pb.ModelInferRequest) -> tuple[pb.ModelInferResponse, dict[str, str]]:
    with grpc.insecure_channel(url) as channel:
        call = channel.unary_unary(
            METHOD,
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString,
        )
        reply, info = call.with_call(req, timeout=30)
        return reply, dict(info.trailing_metadata())


def _error(url: str, req: pb.ModelInferRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _call(url, req)
    return caught.value


def test_appended_fields_override_and_merge():
    req = _request("tiny", np.zeros((1, 16), np.float32), precision="int8")
    forwarded = pb.ModelInferRequest.FromString(
        req.SerializeToString() + model_name_field("tiny_int8")
    )
    assert forwarded.model_name == "tiny_int8"
    assert forwarded.raw_input_contents == req.raw_input_contents
    assert forwarded.parameters["precision"].string_param == "int8"
    reply = pb.ModelInferResponse(model_name="tiny_int8", id="r")
    reply.parameters["other"].int64_param = 3
    merged = pb.ModelInferResponse.FromString(
        reply.SerializeToString() + _precision_parameter("int8")
    )
    assert merged.parameters["precision"].string_param == "int8"
    assert merged.parameters["other"].int64_param == 3
    assert merged.model_name == "tiny_int8" and merged.id == "r"


@pytest.mark.integration
def test_pass_through_returns_tritons_reply_and_tritons_errors(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    manifest = load_manifests(tiny_repository)["tiny"]
    fp16 = manifest.variants["fp16"].triton_name
    triton = start_triton(tiny_repository)
    args = ["--upstream", f"triton://{triton.grpc_url}"]
    x = np.random.default_rng(3).normal(size=(2, 16)).astype(np.float32)
    with GatewayProcess(tiny_repository, extra_args=args) as gw:
        # the reply is Triton's (same bytes for outputs) plus the precision parameter and header
        got, headers = _call(gw.grpc_url, _request("tiny", x, precision="fp16"))
        want, _ = _call(triton.grpc_url, _request(fp16, x, precision="fp16"))
        assert got.model_name == fp16 and got.id == "req-1"
        assert got.parameters["precision"].string_param == "fp16"
        assert headers["x-precision"] == "fp16"
        assert list(got.outputs) == list(want.outputs)
        assert list(got.raw_output_contents) == list(want.raw_output_contents)

        # a request Triton rejects: its status and message reach the client unchanged
        bad = np.zeros((2, 15), np.float32)
        via_gateway = _error(gw.grpc_url, _request("tiny", bad, precision="fp16"))
        direct = _error(triton.grpc_url, _request(fp16, bad, precision="fp16"))
        assert via_gateway.code() == direct.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert via_gateway.details() == direct.details()
        assert fp16 in direct.details()  # Triton's wording, not the gateway's own check

        # the gateway's own errors stay its own: unknown model / precision
        assert _error(gw.grpc_url, _request("nope", x)).code() == grpc.StatusCode.NOT_FOUND
        unknown = _error(gw.grpc_url, _request("tiny", x, precision="fp8"))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND


def _call_requests(metrics_text: str, variant: str) -> tuple[float, float]:
    """(forwarded calls, requests they carried) from precision_serve_upstream_call_requests."""
    from prometheus_client.parser import text_string_to_metric_families

    calls = carried = 0.0
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "precision_serve_upstream_call_requests":
            continue
        for s in family.samples:
            labels = f"{s.labels.get('model')}_{s.labels.get('precision')}"
            if labels == variant and s.name.endswith("_count"):
                calls += s.value
            elif labels == variant and s.name.endswith("_sum"):
                carried += s.value
    return calls, carried


@pytest.mark.integration
def test_concurrent_forwarded_requests_merge_and_each_gets_its_own_answer(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    """With one call in flight allowed (``?merge=1``), 64 concurrent requests of 1-3 rows that
    are all waiting while a call is in flight reach Triton in fewer calls; each client still
    gets exactly Triton's answer to its own request (outputs, id) and a bad request among them
    gets Triton's own error, alone."""
    import asyncio
    import os
    import signal
    import time
    import urllib.request

    manifest = load_manifests(tiny_repository)["tiny"]
    fp32 = manifest.variants["fp32"].triton_name
    triton = start_triton(tiny_repository)
    # merging is the Python front's (Envoy forwards each request as it comes)
    args = ["--upstream", f"triton://{triton.grpc_url}?merge=1&front=python"]
    rng = np.random.default_rng(11)
    inputs = [rng.normal(size=(1 + i % 3, 16)).astype(np.float32) for i in range(64)]
    bad_at = 37
    requests = [_request("tiny", x, precision="fp32") for x in inputs]
    for i, r in enumerate(requests):
        r.id = f"req-{i}"
    requests[bad_at] = _request("tiny", np.zeros((1, 15), np.float32), precision="fp32")
    requests[bad_at].id = "bad"

    async def fire(url: str, reqs: list[pb.ModelInferRequest]) -> list:
        async with grpc.aio.insecure_channel(url) as channel:
            call = channel.unary_unary(
                METHOD,
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            return await asyncio.gather(
                *(call(r, timeout=30) for r in reqs), return_exceptions=True
            )

    def inflight(metrics_url: str) -> float:
        return promtext.total(promtext.scrape(metrics_url), "precision_serve_inflight_requests")

    async def fire_held(gw: GatewayProcess, reqs: list[pb.ModelInferRequest]) -> list:
        """``reqs`` at once while Triton is held (SIGSTOP): the first forwarded call waits in
        Triton, so every other request is waiting in the gateway when it answers - what merging
        is for - whatever the load on the host (without the hold, how many requests arrive per
        Triton round trip depends on how fast this host runs the gateway's loop)."""
        async with grpc.aio.insecure_channel(gw.grpc_url) as channel:
            call = channel.unary_unary(
                METHOD,
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            os.kill(triton.pid, signal.SIGSTOP)
            try:
                calls = [asyncio.ensure_future(call(r, timeout=30)) for r in reqs]
                deadline = time.monotonic() + 10  # well inside the 2 s readiness checks' retries
                while time.monotonic() < deadline:
                    if await asyncio.to_thread(inflight, gw.metrics_url) >= len(reqs):
                        break
                    await asyncio.sleep(0.01)
            finally:
                os.kill(triton.pid, signal.SIGCONT)
            return await asyncio.gather(*calls, return_exceptions=True)

    with GatewayProcess(tiny_repository, extra_args=args) as gw:
        got = asyncio.run(fire_held(gw, requests))
        metrics = urllib.request.urlopen(gw.metrics_url, timeout=10).read().decode()
    direct_requests = [pb.ModelInferRequest() for _ in requests]
    for d, r in zip(direct_requests, requests, strict=True):
        d.CopyFrom(r)
        d.model_name = fp32
    want = [asyncio.run(fire(triton.grpc_url, [d]))[0] for d in direct_requests]

    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if i == bad_at:
            assert isinstance(g, grpc.aio.AioRpcError) and isinstance(w, grpc.aio.AioRpcError)
            assert g.code() == w.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert g.details() == w.details()  # Triton's words about that request only
            continue
        assert not isinstance(g, BaseException), f"request {i}: {g}"
        assert g.id == f"req-{i}" and g.model_name == fp32
        assert list(g.outputs) == list(w.outputs)
        y_got = np.frombuffer(g.raw_output_contents[0], np.float32)
        y_want = np.frombuffer(w.raw_output_contents[0], np.float32)
        np.testing.assert_allclose(y_got, y_want, rtol=1e-5, atol=1e-6)  # batch-size invariant
        assert g.parameters["precision"].string_param == "fp32"
    calls, carried = _call_requests(metrics, fp32)
    assert carried >= len(requests) - 1  # every good request went through a forwarded call
    assert calls < carried / 2, f"{calls} calls carried {carried} requests: little merging"
