"""What the soak sends: valid ModelInfer requests per precision, small malformed requests
(gRPC and HTTP) and 60 MB oversized ones, built once with tritonclient's protobufs.

The 60 MB requests declare the model's real shape for one row (so only their size is wrong):
an HTTP JSON body with ~15 M numbers in ``data``, a gRPC request with ~15 M ``fp32_contents``
and a gRPC request with 60 MB of ``raw_input_contents``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import service_pb2

from common.model_repository import to_datatype

BIG_BYTES = 60 * 1000 * 1000


@dataclass(frozen=True)
class HttpRequest:
    kind: str
    path: str
    body: bytes
    expect: tuple[int, ...]  # acceptable statuses (4xx: the client's fault)


@dataclass(frozen=True)
class GrpcRequest:
    kind: str
    message: bytes  # a serialised ModelInferRequest
    expect: tuple[str, ...]  # acceptable grpc.StatusCode names


def infer_request(
    model: str, inputs: dict[str, np.ndarray], precision: str | None = None
) -> service_pb2.ModelInferRequest:
    """A ModelInferRequest with raw contents; ``precision``: the request parameter."""
    req = service_pb2.ModelInferRequest(model_name=model)
    for name, array in inputs.items():
        t = req.inputs.add(name=name, datatype=to_datatype(array.dtype), shape=list(array.shape))
        del t  # the tensor's data goes in raw_input_contents, in the same order
        req.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    if precision:
        req.parameters["precision"].string_param = precision
    return req


def _json_body(model_inputs: dict[str, np.ndarray], data: dict[str, object] | None = None) -> bytes:
    inputs = []
    for name, array in model_inputs.items():
        inputs.append(
            {
                "name": name,
                "shape": list(array.shape),
                "datatype": to_datatype(array.dtype),
                "data": array.ravel().tolist(),
                **(data or {}),
            }
        )
    return json.dumps({"inputs": inputs}).encode()


def malformed_grpc(model: str, inputs: dict[str, np.ndarray]) -> list[GrpcRequest]:
    name, array = next(iter(inputs.items()))
    bad = "INVALID_ARGUMENT"
    wrong_shape = infer_request(model, inputs)
    wrong_shape.inputs[0].shape[-1] += 1
    wrong_dtype = infer_request(model, {name: array.astype(np.float64)})
    unknown = infer_request(f"{model}_no_such_model", inputs)
    short = infer_request(model, inputs)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-3]
    return [
        GrpcRequest("grpc wrong shape", wrong_shape.SerializeToString(), (bad,)),
        GrpcRequest("grpc wrong dtype", wrong_dtype.SerializeToString(), (bad,)),
        GrpcRequest("grpc unknown model", unknown.SerializeToString(), ("NOT_FOUND",)),
        GrpcRequest("grpc truncated contents", short.SerializeToString(), (bad,)),
    ]


def malformed_http(model: str, inputs: dict[str, np.ndarray]) -> list[HttpRequest]:
    name, array = next(iter(inputs.items()))
    path = f"/v2/models/{model}/infer"
    wrong_shape = json.loads(_json_body(inputs))
    wrong_shape["inputs"][0]["shape"][-1] += 1
    nested = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    return [
        HttpRequest("http bad json", path, b'{"inputs": [{"name": ', (400,)),
        HttpRequest("http wrong shape", path, json.dumps(wrong_shape).encode(), (400,)),
        HttpRequest("http wrong dtype", path, _json_body({name: array.astype(np.float64)}), (400,)),
        HttpRequest(
            "http unknown model",
            f"/v2/models/{model}_no_such_model/infer",
            _json_body(inputs),
            (404,),
        ),
        HttpRequest("http deeply nested json", path, nested, (400,)),
    ]


def big_json(model: str, name: str, row_shape: list[int], datatype: str = "FP32") -> HttpRequest:
    """~60 MB of JSON numbers for a tensor declared as one row."""
    count = BIG_BYTES // 4
    head = json.dumps(
        {"inputs": [{"name": name, "shape": [1, *row_shape], "datatype": datatype, "data": []}]}
    ).encode()
    before, after = head.split(b"[]", 1)
    body = before + b"[" + b"0.0," * (count - 1) + b"0.0]" + after
    return HttpRequest("http 60 MB json", f"/v2/models/{model}/infer", body, (400, 413))


def big_typed(model: str, name: str, row_shape: list[int]) -> GrpcRequest:
    """~60 MB of ``fp32_contents`` for a tensor declared as one row."""
    req = service_pb2.ModelInferRequest(model_name=model)
    t = req.inputs.add(name=name, datatype="FP32", shape=[1, *row_shape])
    t.contents.fp32_contents.extend([0.0] * (BIG_BYTES // 4))
    return GrpcRequest(
        "grpc 60 MB typed contents",
        req.SerializeToString(),
        ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"),
    )


def big_raw(model: str, name: str, row_shape: list[int]) -> GrpcRequest:
    """60 MB of ``raw_input_contents`` for a tensor declared as one row."""
    req = service_pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name=name, datatype="FP32", shape=[1, *row_shape])
    req.raw_input_contents.append(bytes(BIG_BYTES))
    return GrpcRequest(
        "grpc 60 MB raw contents",
        req.SerializeToString(),
        ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"),
    )
