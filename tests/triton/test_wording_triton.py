"""The gateway's answer to a bad request beside real Triton's (the nvidia-pytriton wheel's
``tritonserver``, 2.51) for the same request: the same HTTP status or gRPC code, and the
gateway's message starts with Triton's (the gateway may add its own detail after it;
server/dataplane/wording.py). Both serve the same repository, the tiny model's variants.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.protobuf.message import Message
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from server.runtime.runner import GatewayProcess
from tests.triton.conftest import StartTriton

pytestmark = [pytest.mark.integration, pytest.mark.slow]  # one Triton start, ~10 s

MODEL = "tiny_fp32"  # a Triton model name (a variant, to the gateway)
WRONG = "wrong_model_name"


@dataclass(frozen=True)
class Answer:
    status: str  # HTTP status as a string, or the gRPC code's name
    message: str


def _tensor(name: str = "x", datatype: str = "FP32", shape: tuple[int, ...] = (1, 16)) -> dict:
    return {"name": name, "datatype": datatype, "shape": list(shape), "data": [0] * 16}


def _infer_body(*inputs: dict, **extra: object) -> dict:
    return {"inputs": list(inputs), **extra}


# (case, method, path, body): path relative to /v2
HTTP_CASES = [
    ("metadata, unknown model", "GET", f"/models/{WRONG}", None),
    ("metadata, unknown model and a version", "GET", f"/models/{WRONG}/versions/1", None),
    ("metadata, unknown version", "GET", f"/models/{MODEL}/versions/2", None),
    ("metadata, version 0", "GET", f"/models/{MODEL}/versions/0", None),
    ("metadata, version -1", "GET", f"/models/{MODEL}/versions/-1", None),
    ("metadata, version abc", "GET", f"/models/{MODEL}/versions/abc", None),
    ("config, unknown model", "GET", f"/models/{WRONG}/config", None),
    ("config, unknown version", "GET", f"/models/{MODEL}/versions/3/config", None),
    ("ready, unknown model", "GET", f"/models/{WRONG}/ready", None),
    ("ready, unknown version", "GET", f"/models/{MODEL}/versions/2/ready", None),
    ("statistics, unknown model", "GET", f"/models/{WRONG}/stats", None),
    ("statistics, unknown version", "GET", f"/models/{MODEL}/versions/2/stats", None),
    ("infer, unknown model", "POST", f"/models/{WRONG}/infer", _infer_body(_tensor())),
    ("infer, unknown version", "POST", f"/models/{MODEL}/versions/2/infer", _infer_body(_tensor())),
    ("infer, wrong input name", "POST", f"/models/{MODEL}/infer", _infer_body(_tensor("y"))),
    ("infer, no inputs", "POST", f"/models/{MODEL}/infer", _infer_body()),
    ("infer, input twice", "POST", f"/models/{MODEL}/infer", _infer_body(_tensor(), _tensor())),
    ("infer, datatype", "POST", f"/models/{MODEL}/infer", _infer_body(_tensor(datatype="INT32"))),
    (
        "infer, datatype, with an id",
        "POST",
        f"/models/{MODEL}/infer",
        _infer_body(_tensor(datatype="INT32"), id="r7"),
    ),
    ("infer, shape", "POST", f"/models/{MODEL}/infer", _infer_body(_tensor(shape=(2, 8)))),
    ("infer, no batch dim", "POST", f"/models/{MODEL}/infer", _infer_body(_tensor(shape=(16,)))),
    (
        "infer, batch over max_batch_size",
        "POST",
        f"/models/{MODEL}/infer",
        _infer_body({**_tensor(shape=(33, 16)), "data": [0] * 33 * 16}),
    ),
    (
        "infer, unknown output",
        "POST",
        f"/models/{MODEL}/infer",
        _infer_body(_tensor(), outputs=[{"name": "nope"}]),
    ),
]


def _infer(
    model: str = MODEL,
    version: str = "",
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...] = (("x", "FP32", (1, 16)),),
    outputs: tuple[str, ...] = (),
    request_id: str = "",
    raw_bytes: int | None = None,
) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, datatype, shape in inputs:
        r.inputs.add(name=name, datatype=datatype, shape=shape)
        size = int(np.prod(shape)) * 4 if raw_bytes is None else raw_bytes
        r.raw_input_contents.append(bytes(size))
    for name in outputs:
        r.outputs.add(name=name)
    return r


GRPC_CASES: list[tuple[str, str, Message]] = [
    ("metadata, unknown model", "ModelMetadata", pb.ModelMetadataRequest(name=WRONG)),
    (
        "metadata, unknown model and a version",
        "ModelMetadata",
        pb.ModelMetadataRequest(name=WRONG, version="2"),
    ),
    (
        "metadata, unknown version",
        "ModelMetadata",
        pb.ModelMetadataRequest(name=MODEL, version="2"),
    ),
    ("metadata, version -1", "ModelMetadata", pb.ModelMetadataRequest(name=MODEL, version="-1")),
    (
        "metadata, version abc",
        "ModelMetadata",
        pb.ModelMetadataRequest(name=MODEL, version="abc"),
    ),
    ("config, unknown model", "ModelConfig", pb.ModelConfigRequest(name=WRONG)),
    ("config, unknown version", "ModelConfig", pb.ModelConfigRequest(name=MODEL, version="3")),
    ("ready, unknown model", "ModelReady", pb.ModelReadyRequest(name=WRONG)),
    ("ready, unknown version", "ModelReady", pb.ModelReadyRequest(name=MODEL, version="2")),
    ("statistics, unknown model", "ModelStatistics", pb.ModelStatisticsRequest(name=WRONG)),
    (
        "statistics, unknown version",
        "ModelStatistics",
        pb.ModelStatisticsRequest(name=MODEL, version="2"),
    ),
    ("infer, unknown model", "ModelInfer", _infer(model=WRONG)),
    ("infer, unknown version", "ModelInfer", _infer(version="2")),
    ("infer, wrong input name", "ModelInfer", _infer(inputs=(("y", "FP32", (1, 16)),))),
    ("infer, no inputs", "ModelInfer", _infer(inputs=())),
    ("infer, input twice", "ModelInfer", _infer(inputs=(("x", "FP32", (1, 16)),) * 2)),
    ("infer, datatype", "ModelInfer", _infer(inputs=(("x", "INT32", (1, 16)),))),
    ("infer, shape", "ModelInfer", _infer(inputs=(("x", "FP32", (1, 8)),))),
    (
        "infer, shape, with an id",
        "ModelInfer",
        _infer(inputs=(("x", "FP32", (1, 8)),), request_id="r7"),
    ),
    ("infer, batch over max_batch_size", "ModelInfer", _infer(inputs=(("x", "FP32", (33, 16)),))),
    ("infer, unknown output", "ModelInfer", _infer(outputs=("nope",))),
    ("infer, raw bytes for another shape", "ModelInfer", _infer(raw_bytes=60)),
]

# The cases where the gateway's words differ from Triton's on purpose: Triton's message is
# compared up to the marker (None: the status only)
DIFFERENT: dict[tuple[str, str], str | None] = {
    # Triton's HTTP routes take digits only: its 404 says "Not Found"; the gateway's 404 says
    # what is wrong with the version, in Triton's gRPC words
    ("http", "metadata, version -1"): None,
    ("http", "metadata, version abc"): None,
    # "(details: stol)" is a C++ function's name
    ("grpc", "metadata, version abc"): " (details",
    # Triton lists the inputs in its hash map's order and prints "missing required input(s) ]"
    # when none is missing; the gateway lists them in the request's order and prints "[]"
    ("http", "infer, extra input"): "Got input(s)",
    ("grpc", "infer, extra input"): "Got input(s)",
}


def _http(base: str, method: str, path: str, body: dict | None) -> Answer:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://{base}/v2{path}", method=method, data=data)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return Answer(str(r.status), r.read().decode())
    except urllib.error.HTTPError as e:
        return Answer(str(e.code), json.loads(e.read() or b"{}").get("error", ""))


def _grpc(channel: grpc.Channel, method: str, request: Message) -> Answer:
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    try:
        reply = getattr(stub, method)(request, timeout=30)
    except grpc.RpcError as e:
        return Answer(e.code().name, e.details() or "")
    return Answer("OK", str(reply).strip())


def _answers(http_url: str, grpc_url: str) -> dict[tuple[str, str], Answer]:
    out = {}
    for case, method, path, body in HTTP_CASES:
        out["http", case] = _http(http_url, method, path, body)
    extra = _infer_body(_tensor(), _tensor("y"))
    out["http", "infer, extra input"] = _http(http_url, "POST", f"/models/{MODEL}/infer", extra)
    with grpc.insecure_channel(grpc_url) as channel:
        for case, method, request in GRPC_CASES:
            out["grpc", case] = _grpc(channel, method, request)
        extra_in = _infer(inputs=(("x", "FP32", (1, 16)), ("y", "FP32", (1, 16))))
        out["grpc", "infer, extra input"] = _grpc(channel, "ModelInfer", extra_in)
    return out


def test_the_gateway_answers_bad_requests_in_tritons_words(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    triton = start_triton(tiny_repository)
    theirs = _answers(triton.http_url, triton.grpc_url)
    with GatewayProcess(tiny_repository, extra_args=["--upstream", "embedded?threads=1"]) as gw:
        ours = _answers(gw.http_url, gw.grpc_url)

    mismatches = []
    for key, t in theirs.items():
        g = ours[key]
        marker = DIFFERENT.get(key, "")
        same_words = marker is None or g.message.startswith(
            t.message.split(marker)[0] if marker else t.message
        )
        if g.status != t.status or not same_words:
            mismatches.append(f"{key}:\n  Triton  {t}\n  gateway {g}")
    assert not mismatches, "\n".join(mismatches)
    for transport in ("http", "grpc"):  # where the gateway parts from Triton's extra-input words
        g = ours[transport, "infer, extra input"]
        assert "expected 1 inputs but got 2 inputs for model 'tiny_fp32'. " in g.message
        assert g.message.endswith(
            "Got input(s) ['x','y'], but missing required input(s) []. Please provide all "
            "required input(s)."
        )
