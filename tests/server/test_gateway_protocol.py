"""The gateway through tritonclient (gRPC, gRPC aio, HTTP) as a user would use it.

One gateway subprocess (tiny model: fp32/fp16/int8) serves the whole module.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from tests.server.conftest import ort_outputs, rows

pytestmark = pytest.mark.integration
PRECISIONS = ["fp32", "fp16", "int8"]


def grpc_infer(gw, model, x, **kw):
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer(model, [inp], **kw)


def http_infer(gw, model, x, binary=True, **kw):
    client = httpclient.InferenceServerClient(gw.http_url)
    inp = httpclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=binary)
    outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
    return client.infer(model, [inp], outputs=outputs, **kw)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_variant_matches_onnxruntime_over_grpc_and_http(gateway, tiny_repository, precision):
    x = rows(5, seed=1)
    want = ort_outputs(tiny_repository, precision, x)
    name = f"tiny_{precision}"
    got_grpc = grpc_infer(gateway, name, x)
    assert got_grpc.get_response().model_name == name
    np.testing.assert_allclose(got_grpc.as_numpy("logits"), want, rtol=1e-5, atol=1e-6)
    for binary in (True, False):
        got_http = http_infer(gateway, name, x, binary=binary)
        assert got_http.get_response()["model_name"] == name
        np.testing.assert_allclose(got_http.as_numpy("logits"), want, rtol=1e-5, atol=1e-6)


def test_grpc_aio_client_and_typed_contents(gateway, tiny_repository):
    x = rows(2, seed=2)

    async def run():
        client = aioclient.InferenceServerClient(gateway.grpc_url)
        try:
            inp = aioclient.InferInput("x", [2, 16], "FP32")
            inp.set_data_from_numpy(x)
            result = await client.infer("tiny_int8", [inp])
            return result.as_numpy("logits")
        finally:
            await client.close()

    want = ort_outputs(tiny_repository, "int8", x)
    np.testing.assert_allclose(asyncio.run(run()), want, rtol=1e-5, atol=1e-6)
    # typed contents (fp32_contents) instead of raw_input_contents, through the raw stub
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name="tiny_fp32")
        t = req.inputs.add(name="x", datatype="FP32", shape=[2, 16])
        t.contents.fp32_contents.extend(x.flatten().tolist())
        resp = stub.ModelInfer(req)
    got = np.frombuffer(resp.raw_output_contents[0], dtype=np.float32).reshape(2, 4)
    np.testing.assert_allclose(got, ort_outputs(tiny_repository, "fp32", x), rtol=1e-5, atol=1e-6)


def test_logical_model_routes_by_parameter_then_header(gateway, tiny_repository):
    x = rows(1, seed=3)
    # default policy: fixed on the most accurate variant
    r = grpc_infer(gateway, "tiny", x)
    assert r.get_response().model_name == "tiny_fp32"
    assert r.get_response().parameters["precision"].string_param == "fp32"
    # header only
    r = grpc_infer(gateway, "tiny", x, headers={"x-precision": "int8"})
    assert r.get_response().parameters["precision"].string_param == "int8"
    np.testing.assert_allclose(
        r.as_numpy("logits"), ort_outputs(tiny_repository, "int8", x), rtol=1e-5, atol=1e-6
    )
    # the request parameter wins over the header
    r = grpc_infer(
        gateway, "tiny", x, parameters={"precision": "fp16"}, headers={"x-precision": "int8"}
    )
    assert r.get_response().model_name == "tiny_fp16"
    r = http_infer(
        gateway, "tiny", x, parameters={"precision": "int8"}, headers={"x-precision": "fp16"}
    )
    assert r.get_response()["parameters"]["precision"] == "int8"
    assert r.get_response()["model_name"] == "tiny_int8"
    # same output names and dtypes whatever the precision
    assert r.as_numpy("logits").dtype == np.float32


def test_response_carries_precision_header(gateway):
    x = rows(1)
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = pb.ModelInferRequest(model_name="tiny")
        req.inputs.add(name="x", datatype="FP32", shape=[1, 16])
        req.raw_input_contents.append(x.tobytes())
        req.parameters["precision"].string_param = "fp16"
        _, call = stub.ModelInfer.with_call(req)
        assert dict(call.trailing_metadata())["x-precision"] == "fp16"
    body = json.dumps(
        {
            "inputs": [
                {"name": "x", "datatype": "FP32", "shape": [1, 16], "data": x.flatten().tolist()}
            ]
        }
    ).encode()
    req = urllib.request.Request(
        f"http://{gateway.http_url}/v2/models/tiny/infer",
        data=body,
        headers={"x-precision": "int8", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["x-precision"] == "int8"
        doc = json.loads(resp.read())
    assert doc["parameters"]["precision"] == "int8" and doc["outputs"][0]["shape"] == [1, 4]


def test_metadata_config_index_and_statistics(gateway):
    g = grpcclient.InferenceServerClient(gateway.grpc_url)
    h = httpclient.InferenceServerClient(gateway.http_url)
    assert g.is_server_live() and g.is_server_ready() and h.is_server_live() and h.is_server_ready()
    for name in ("tiny", "tiny_fp32", "tiny_fp16", "tiny_int8"):
        assert g.is_model_ready(name) and h.is_model_ready(name)
        meta = h.get_model_metadata(name)
        assert meta["name"] == name
        assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
        assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 4]}]
        assert g.get_model_metadata(name).inputs[0].shape == [-1, 16]
    cfg = g.get_model_config("tiny").config
    assert cfg.name == "tiny" and cfg.max_batch_size == 32  # the default (fp32) variant's config
    assert cfg.HasField("dynamic_batching")
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert h.get_model_config("tiny_int8")["name"] == "tiny_int8"
    assert g.get_server_metadata().name == "precision-serve"
    index = {m.name: m.state for m in g.get_model_repository_index().models}
    assert index == {n: "READY" for n in ("tiny", "tiny_fp32", "tiny_fp16", "tiny_int8")}
    assert {m["name"] for m in h.get_model_repository_index()} == set(index)
    grpc_infer(gateway, "tiny_fp16", rows(2))
    stats = g.get_inference_statistics("tiny_fp16").model_stats[0]
    assert stats.name == "tiny_fp16" and stats.inference_stats.success.count >= 1
    assert stats.inference_count >= 2
    assert h.get_inference_statistics("tiny_fp16")["model_stats"][0]["name"] == "tiny_fp16"
    logical = g.get_inference_statistics("tiny").model_stats  # one entry, as Triton gives
    assert [(s.name, s.version) for s in logical] == [("tiny", "1")]
    with pytest.raises(InferenceServerException):
        h.get_inference_statistics("nope")


def _grpc_error(fn) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        fn()
    return info.value


def _raw_grpc(gw, req: pb.ModelInferRequest) -> grpc.RpcError:
    with grpc.insecure_channel(gw.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, timeout=10)
    return info.value


def _raw_http(gw, model: str, doc: dict) -> tuple[int, str]:
    req = urllib.request.Request(
        f"http://{gw.http_url}/v2/models/{model}/infer", data=json.dumps(doc).encode()
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())["error"]


def _tensor(name="x", datatype="FP32", shape=(1, 16), data=None):
    n = int(np.prod(shape))
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": data or [0.5] * n}


def test_not_found_errors(gateway):
    x = rows(1)
    e = _grpc_error(lambda: grpc_infer(gateway, "nope", x))
    assert e.status() == "StatusCode.NOT_FOUND"
    assert e.message().startswith("Request for unknown model: 'nope' is not found")
    e = _grpc_error(lambda: grpc_infer(gateway, "tiny", x, parameters={"precision": "fp8"}))
    assert e.status() == "StatusCode.NOT_FOUND" and "fp8" in e.message()
    e = _grpc_error(lambda: grpc_infer(gateway, "tiny", x, model_version="7"))
    assert e.status() == "StatusCode.NOT_FOUND"
    assert e.message().startswith("Request for unknown model: 'tiny' version 7 is not found")
    e = _grpc_error(lambda: http_infer(gateway, "nope", x))
    assert e.status() == "404"
    assert e.message().startswith("Request for unknown model: 'nope' is not found")
    e = _grpc_error(lambda: http_infer(gateway, "tiny", x, headers={"x-precision": "fp8"}))
    assert e.status() == "404" and "fp8" in e.message()
    e = _grpc_error(
        lambda: grpcclient.InferenceServerClient(gateway.grpc_url).get_model_metadata("nope")
    )
    assert e.status() == "StatusCode.NOT_FOUND"
    assert e.message().startswith("Request for unknown model: 'nope' is not found")


def test_unknown_names_and_versions_get_tritons_status_and_words(gateway):
    """Ready, statistics and versions answer as Triton 2.51 does (tests/triton/
    test_wording_triton.py compares with the real one)."""
    g = grpcclient.InferenceServerClient(gateway.grpc_url)
    h = httpclient.InferenceServerClient(gateway.http_url)
    # ready: gRPC says "not ready" (no error), HTTP 400 "Model version not ready" (+ why)
    assert g.is_model_ready("nope") is False and g.is_model_ready("tiny", "2") is False
    assert h.is_model_ready("nope") is False
    try:
        urllib.request.urlopen(f"http://{gateway.http_url}/v2/models/nope/ready", timeout=10)
    except urllib.error.HTTPError as e:
        status, error = e.code, json.loads(e.read())["error"]
    assert status == 400
    assert error.startswith("Model version not ready: Request for unknown model: 'nope'")
    # statistics: INVALID_ARGUMENT / 400
    e = _grpc_error(lambda: g.get_inference_statistics("nope"))
    assert (e.status(), e.message()) == (
        "StatusCode.INVALID_ARGUMENT",
        "requested model 'nope' is not available",
    )
    e = _grpc_error(lambda: h.get_inference_statistics("tiny", "2"))
    assert (e.status(), e.message()) == (
        "400",
        "requested model version is not available for model 'tiny'",
    )
    # a version that is not a number: INVALID_ARGUMENT over gRPC, 404 over HTTP (Triton's route)
    e = _grpc_error(lambda: g.get_model_metadata("tiny", "abc"))
    assert e.status() == "StatusCode.INVALID_ARGUMENT"
    assert e.message().startswith("failed to get model version from specified version string 'abc'")
    e = _grpc_error(lambda: h.get_model_metadata("tiny", "-1"))
    assert e.status() == "404" and e.message().startswith("invalid model version specified '-1'")
    # "01" is version 1, as Triton reads it; other numbers are unknown versions
    assert g.get_model_metadata("tiny", "01").name == "tiny"
    e = _grpc_error(lambda: g.get_model_config("tiny", "2"))
    assert e.status() == "StatusCode.NOT_FOUND"
    assert e.message().startswith("Request for unknown model: 'tiny' version 2 is not found")


_NOTE = "NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension"


@pytest.mark.parametrize(
    ("tensor", "needle"),
    [
        # Triton's words (server/dataplane/wording.py), naming the model as the request did
        (_tensor(name="y"), "unexpected inference input 'y' for model 'tiny'"),
        (
            _tensor(datatype="FP64"),
            "[request id: <id_unknown>] inference input 'x' data-type is 'FP64', but model "
            "'tiny' expects 'FP32'",
        ),
        (
            _tensor(shape=(1, 15)),
            "[request id: <id_unknown>] unexpected shape for input 'x' for model 'tiny'. "
            f"Expected [-1,16], got [1,15]. {_NOTE}",
        ),
        (
            _tensor(shape=(16,)),
            "[request id: <id_unknown>] unexpected shape for input 'x' for model 'tiny'. "
            f"Expected [-1,16], got [16]. {_NOTE}",
        ),
        (
            _tensor(shape=(33, 16)),
            "[request id: <id_unknown>] inference request batch-size must be <= 32 for 'tiny'",
        ),
        (_tensor(shape=(1, 16), data=[1.0] * 15), "got 15 values, expected 16"),
    ],
)
def test_invalid_argument_over_http_names_the_input(gateway, tensor, needle):
    status, message = _raw_http(gateway, "tiny", {"inputs": [tensor]})
    assert status == 400
    assert needle in message


def test_invalid_argument_over_grpc_names_the_input(gateway):
    # missing input
    req = pb.ModelInferRequest(model_name="tiny")
    err = _raw_grpc(gateway, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "[request id: <id_unknown>] expected 1 inputs but got 0 inputs for model 'tiny'. Got "
        "input(s) [], but missing required input(s) ['x']. Please provide all required input(s)."
    )
    # wrong dtype
    req = pb.ModelInferRequest(model_name="tiny_int8")
    req.inputs.add(name="x", datatype="INT64", shape=[1, 16])
    req.raw_input_contents.append(np.zeros((1, 16), np.int64).tobytes())
    err = _raw_grpc(gateway, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == (
        "[request id: <id_unknown>] inference input 'x' data-type is 'INT64', but model "
        "'tiny_int8' expects 'FP32'"
    )
    # byte count not matching the shape
    req = pb.ModelInferRequest(model_name="tiny", id="r1")
    req.inputs.add(name="x", datatype="FP32", shape=[2, 16])
    req.raw_input_contents.append(np.zeros((1, 16), np.float32).tobytes())
    err = _raw_grpc(gateway, req)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(
        "[request id: r1] input byte size mismatch for input 'x' for model 'tiny'. "
        "Expected 128, got 64"
    )
    # wrong shape through tritonclient
    e = _grpc_error(lambda: grpc_infer(gateway, "tiny", np.zeros((1, 8), np.float32)))
    assert e.status() == "StatusCode.INVALID_ARGUMENT"
    assert "unexpected shape for input 'x' for model 'tiny'. Expected [-1,16]" in e.message()


def test_payload_over_limit_is_resource_exhausted(gateway):
    big = np.zeros((32, 1024), np.float32)  # 128 KiB > --max-request-bytes 65536
    e = _grpc_error(lambda: grpc_infer(gateway, "tiny", big))
    assert e.status() == "StatusCode.RESOURCE_EXHAUSTED"
    e = _grpc_error(lambda: http_infer(gateway, "tiny", big))
    assert e.status() == "413"
    # and the gateway still answers
    assert grpc_infer(gateway, "tiny", rows(1)).as_numpy("logits").shape == (1, 4)


def test_timeout_parameter_is_honoured_over_http(gateway):
    # tritonclient's ``timeout`` (microseconds) is a request parameter; 1 us has passed on arrival
    e = _grpc_error(lambda: http_infer(gateway, "tiny", rows(1), timeout=1))
    assert e.status() == "504" and "deadline" in e.message()


def test_metrics_series_appear_after_traffic(gateway):
    grpc_infer(gateway, "tiny", rows(2))
    http_infer(gateway, "tiny", rows(1), parameters={"precision": "int8"})
    _grpc_error(lambda: grpc_infer(gateway, "nope", rows(1)))
    with urllib.request.urlopen(gateway.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    for line in (
        'precision_serve_requests_total{model="tiny",precision="fp32",protocol="grpc",status="ok"}',
        'precision_serve_requests_total{model="tiny",precision="int8",protocol="http",status="ok"}',
        'precision_serve_requests_total{model="unknown",precision="none",protocol="grpc",'
        'status="NOT_FOUND"}',
        'precision_serve_request_duration_seconds_bucket{le="0.001",model="tiny",precision="fp32"}',
        'precision_serve_queue_duration_seconds_count{model="tiny",precision="fp32"}',
        'precision_serve_upstream_duration_seconds_count{model="tiny",precision="int8"}',
        'precision_serve_batch_size_count{model="tiny",precision="fp32"}',
        'precision_serve_inflight_requests{model="tiny"} 0.0',
        'precision_serve_routing_decisions_total{model="tiny",policy="fixed",precision="fp32"}',
        'precision_serve_routing_decisions_total{model="tiny",policy="request",precision="int8"}',
        'precision_serve_upstream_ready{model="tiny_int8",upstream="embedded"} 1.0',
        "process_cpu_seconds_total",
    ):
        assert line in text, line
