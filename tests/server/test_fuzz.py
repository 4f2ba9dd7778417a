"""Property-based fuzzing: malformed requests get 4xx / client-error statuses, never a crash,
and valid requests keep answering correctly in between."""

from __future__ import annotations

import http.client
import json
import string
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from server.dataplane.tensors import WireTensor, decode
from server.errors import InvalidInput
from tests.server.conftest import ort_outputs, rows

pytestmark = pytest.mark.integration

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
DATATYPES = ["FP32", "FP16", "FP64", "INT64", "INT8", "UINT8", "BOOL", "BYTES", "BF16", "bogus", ""]
names = st.sampled_from(["x", "y", "", "x" * 300])
shapes = st.lists(st.integers(-3, 40), max_size=4)
scalars = st.one_of(
    st.floats(allow_nan=True), st.integers(-(2**70), 2**70), st.text(max_size=5), st.none()
)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=5), max_leaves=40)
params = st.dictionaries(
    st.sampled_from(["precision", "timeout", "binary_data_size", "x-request-key", "binary_data"]),
    scalars,
    max_size=3,
)
json_tensor = st.fixed_dictionaries(
    {},
    optional={
        "name": st.one_of(names, st.integers()),
        "datatype": st.one_of(st.sampled_from(DATATYPES), st.integers()),
        "shape": st.one_of(shapes, st.text(max_size=3)),
        "data": json_values,
        "parameters": st.one_of(params, st.integers()),
    },
)
json_doc = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.one_of(st.lists(json_tensor, max_size=3), json_values),
        "outputs": st.one_of(st.lists(st.fixed_dictionaries({"name": names})), json_values),
        "parameters": st.one_of(params, json_values),
        "id": scalars,
    },
)


@cache
def _reference(repo: Path) -> np.ndarray:
    return ort_outputs(repo, "fp32", rows(2, seed=11))


def _valid_still_correct(gateway, tiny_repository) -> None:
    x = rows(2, seed=11)
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="x", datatype="FP32", shape=[2, 16])
    req.raw_input_contents.append(x.tobytes())
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=10)
    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 4)
    np.testing.assert_allclose(got, _reference(tiny_repository), rtol=1e-5, atol=1e-6)


@FUZZ
@given(
    doc=json_doc,
    binary=st.binary(max_size=300),
    header_length=st.one_of(
        st.none(), st.integers(-5, 400), st.text(alphabet=string.ascii_letters + "-.", max_size=4)
    ),
    model=st.sampled_from(["tiny", "tiny_int8", "nope"]),
    raw_garbage=st.booleans(),
)
def test_http_fuzz(gateway, tiny_repository, doc, binary, header_length, model, raw_garbage):
    head = binary if raw_garbage else json.dumps(doc).encode()
    body = head + (b"" if raw_garbage else binary)
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    host, port = gateway.http_url.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("POST", f"/v2/models/{model}/infer", body=body, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
    finally:
        conn.close()
    assert resp.status in (200, 400, 404, 413, 504), payload
    if resp.status != 200:
        assert json.loads(payload)["error"]
    _valid_still_correct(gateway, tiny_repository)


grpc_tensor = st.builds(
    lambda name, datatype, shape: pb.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=[max(-(2**40), min(2**40, d)) for d in shape]
    ),
    names,
    st.sampled_from(DATATYPES),
    st.lists(st.integers(-3, 40), max_size=4),
)


@FUZZ
@given(
    model=st.sampled_from(["tiny", "tiny_fp16", "nope", ""]),
    version=st.sampled_from(["", "1", "2", "x"]),
    tensors=st.lists(grpc_tensor, max_size=3),
    raw=st.lists(st.binary(max_size=200), max_size=3),
    typed=st.lists(st.floats(width=32, allow_nan=True), max_size=40),
    precision=st.one_of(
        st.none(), st.sampled_from(["fp32", "int8", "fp8", ""]), st.integers(-(2**63), 2**63 - 1)
    ),
    timeout=st.one_of(st.none(), st.integers(-10, 10)),
)
def test_grpc_fuzz(
    gateway, tiny_repository, model, version, tensors, raw, typed, precision, timeout
):
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    req.inputs.extend(tensors)
    if raw:
        req.raw_input_contents.extend(raw)
    elif req.inputs:
        req.inputs[0].contents.fp32_contents.extend(typed)
    if isinstance(precision, str):
        req.parameters["precision"].string_param = precision
    elif precision is not None:
        req.parameters["precision"].int64_param = precision
    if timeout is not None:
        req.parameters["timeout"].int64_param = timeout
    with grpc.insecure_channel(gateway.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            stub.ModelInfer(req, timeout=10)
        except grpc.RpcError as e:
            assert e.code() in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.DEADLINE_EXCEEDED,
            ), e.details()
    _valid_still_correct(gateway, tiny_repository)


@settings(max_examples=300, deadline=None)
@given(
    datatype=st.sampled_from(DATATYPES),
    shape=shapes,
    raw=st.one_of(st.none(), st.binary(max_size=64)),
    values=json_values,
)
def test_decode_either_matches_shape_or_names_the_input(datatype, shape, raw, values):
    t = WireTensor("inp", datatype, shape, raw=raw, values=None if raw is not None else values)
    try:
        arr = decode(t)
    except InvalidInput as e:
        assert "'inp'" in e.message
        return
    assert list(arr.shape) == shape
