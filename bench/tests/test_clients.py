"""bench/clients.py, the benchmark's raw gRPC client: tensors through the dtype map
(common/model_repository/dtypes.py) both ways."""

from __future__ import annotations

import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from bench import clients
from common.model_repository import DtypeError
from common.model_repository.dtypes import to_datatype


@pytest.mark.parametrize("dtype", ["float32", "float16", "int64", "uint16", "int8", "bool"])
def test_bench_client_round_trips_raw_tensors(dtype: str) -> None:
    arr = (np.arange(6) % 2).astype(dtype).reshape(2, 3)
    request = service_pb2.ModelInferRequest.FromString(clients.infer_request_bytes("m", {"x": arr}))
    assert request.inputs[0].datatype == to_datatype(dtype)
    response = service_pb2.ModelInferResponse(model_name="m")
    response.outputs.add(name="y", datatype=request.inputs[0].datatype, shape=[2, 3])
    response.raw_output_contents.append(request.raw_input_contents[0])
    outputs, _ = clients.decode_response(response.SerializeToString())
    assert outputs["y"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(outputs["y"], arr)


def test_bench_client_refuses_an_unknown_response_datatype() -> None:
    response = service_pb2.ModelInferResponse(model_name="m")
    response.outputs.add(name="y", datatype="FP8", shape=[4])
    response.raw_output_contents.append(b"\0" * 4)
    with pytest.raises(DtypeError, match="FP8"):
        clients.decode_response(response.SerializeToString())
