"""Triton's clients through the gateway in front of a real Triton (``--upstream triton://``):
streaming forwards each request and keeps going after a bad one; model control unloads and
loads on the replica, with routing falling back meanwhile."""

from __future__ import annotations

import queue
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server.runtime.runner import GatewayProcess
from tests.triton.conftest import StartTriton

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # one Triton start, ~30 s


def _input(dtype: str = "FP32") -> grpcclient.InferInput:
    inp = grpcclient.InferInput("x", [1, 16], dtype)
    inp.set_data_from_numpy(np.ones((1, 16), np.float32 if dtype == "FP32" else np.int32))
    return inp


def _index(client: grpcclient.InferenceServerClient) -> dict[str, str]:
    return {m.name: m.state for m in client.get_model_repository_index().models}


def test_streaming_and_model_control_through_a_triton_upstream(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    triton = start_triton(tiny_repository, model_control="explicit")
    args = ["--upstream", f"triton://{triton.grpc_url}?front=envoy", "--model-control", "explicit"]
    with GatewayProcess(tiny_repository, extra_args=args) as gw:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        replica = grpcclient.InferenceServerClient(triton.grpc_url)
        # a stream: good, bad (Triton's own error), good - in request order, the stream goes on
        answers: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        client.async_stream_infer(
            "tiny", [_input()], request_id="a", parameters={"precision": "int8"}
        )
        client.async_stream_infer("tiny_fp16", [_input("INT32")], request_id="b")
        client.async_stream_infer("tiny_fp16", [_input()], request_id="c")
        got = [answers.get(timeout=30) for _ in range(3)]
        client.stop_stream()
        (a, ea), (none, eb), (c, ec) = got
        assert ea is None and ec is None and none is None and eb is not None
        assert "INT32" in eb.message() or "TYPE_INT32" in eb.message()
        assert a.get_response().id == "a"
        assert a.get_response().parameters["precision"].string_param == "int8"
        assert c.get_response().id == "c" and c.get_response().model_name == "tiny_fp16"

        # unload through the gateway: done on the replica, routing falls back meanwhile
        client.unload_model("tiny_int8")
        try:
            assert _index(replica)["tiny_int8"] in ("UNLOADING", "UNAVAILABLE")  # asynchronous
            assert not client.is_model_ready("tiny_int8")
            served = client.infer("tiny", [_input()], parameters={"precision": "int8"})
            params = served.get_response().parameters
            assert params["precision"].string_param == "fp16"
            assert params["fallback_from"].string_param == "int8"  # pass-through says so too
        finally:
            httpclient.InferenceServerClient(gw.http_url).load_model("tiny_int8")
        assert _index(replica)["tiny_int8"] == "READY" and client.is_model_ready("tiny_int8")
        served = client.infer("tiny", [_input()], parameters={"precision": "int8"})
        assert served.get_response().parameters["precision"].string_param == "int8"
        with pytest.raises(InferenceServerException) as info:
            client.load_model("nope")
        assert info.value.message().startswith(
            "failed to load 'nope', Request for unknown model: 'nope' is not found"
        )
        client.close()
        replica.close()
