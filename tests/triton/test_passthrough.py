"""Pass-through to Triton: the gateway forwards ModelInfer as the client's bytes (variant name
appended) and returns Triton's reply bytes with the precision parameter appended."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from common.model_repository import load_manifests
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
