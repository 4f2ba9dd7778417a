"""The one dtype map (common.model_repository.dtypes) and ONNX Runtime's type names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from common.engines import EngineError, get_engine
from common.engines.onnxruntime_engine import ort_dtype
from common.model_repository import DtypeError
from common.model_repository.dtypes import (
    config_type_to_datatype,
    from_config_type,
    from_datatype,
    to_config_type,
    to_datatype,
)

# every KServe v2 datatype Triton's config enum has (TYPE_STRING is BYTES on the wire)
DATATYPES = [
    "BYTES" if n == "TYPE_STRING" else n.removeprefix("TYPE_")
    for n in (v.name for v in mc.DataType.DESCRIPTOR.values)
    if n != "TYPE_INVALID"
]
EXPECTED = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BYTES": "object",
    "BF16": "bfloat16",  # ml_dtypes' numpy type, through tritonclient
}


def test_every_config_type_is_covered() -> None:
    assert sorted(DATATYPES) == sorted(EXPECTED)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_datatype_round_trips_through_numpy_and_the_config_enum(datatype: str) -> None:
    dtype = from_datatype(datatype)
    assert dtype.name == EXPECTED[datatype]
    assert to_datatype(dtype) == datatype
    assert to_datatype(dtype.name) == datatype
    config = to_config_type(dtype)
    assert mc.DataType.Name(config) == "TYPE_" + ("STRING" if datatype == "BYTES" else datatype)
    assert from_config_type(config) == dtype
    assert config_type_to_datatype(config) == datatype


@pytest.mark.parametrize("dtype", ["complex64", "complex128", "datetime64[s]", "U8", "V4"])
def test_numpy_dtypes_without_a_triton_type_are_errors(dtype: str) -> None:
    with pytest.raises(DtypeError, match="no KServe v2 / Triton equivalent"):
        to_datatype(dtype)
    with pytest.raises(DtypeError):
        to_config_type(dtype)


def test_a_non_dtype_is_an_error() -> None:
    with pytest.raises(DtypeError, match="not a numpy dtype"):
        to_datatype("not-a-dtype")


@pytest.mark.parametrize("datatype", ["FP8", "fp32", "TYPE_FP32", "STRING", "", None])
def test_unknown_datatypes_are_errors(datatype: str | None) -> None:
    with pytest.raises(DtypeError, match="no numpy equivalent"):
        from_datatype(datatype)  # type: ignore[arg-type]


@pytest.mark.parametrize("data_type", [mc.TYPE_INVALID, 999])
def test_unknown_config_types_are_errors(data_type: int) -> None:
    with pytest.raises(DtypeError):
        from_config_type(data_type)


@pytest.mark.parametrize(
    ("ort_type", "dtype"),
    [
        ("tensor(float)", "float32"),
        ("tensor(double)", "float64"),
        ("tensor(float16)", "float16"),
        ("tensor(string)", "object"),
        ("tensor(bool)", "bool"),
        ("tensor(uint16)", "uint16"),
        ("tensor(int64)", "int64"),
    ],
)
def test_ort_type_names(ort_type: str, dtype: str) -> None:
    assert ort_dtype(ort_type) == np.dtype(dtype)


@pytest.mark.parametrize(
    "ort_type",
    ["tensor(complex64)", "tensor(float8e4m3fn)", "tensor(int4)", "seq(tensor(float))", "map"],
)
def test_ort_types_the_gateway_cannot_serve_are_errors(ort_type: str) -> None:
    with pytest.raises(DtypeError, match=r"tensor|numpy|Triton"):
        ort_dtype(ort_type)


def _model_with_float8_output(path: Path) -> Path:
    """x: float [-1, 2] -> x_out (Identity), y: float8e4m3fn (Cast): no numpy / KServe type."""
    nodes = [
        helper.make_node("Identity", ["x"], ["x_out"]),
        helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E4M3FN),
    ]
    graph = helper.make_graph(
        nodes,
        "float8_out",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])],
        [
            helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT8E4M3FN, ["batch", 2]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_onnxruntime_output_of_an_unmappable_type_is_a_clear_engine_error(tmp_path: Path) -> None:
    path = _model_with_float8_output(tmp_path / "f8.onnx")
    with pytest.raises(EngineError) as err:
        get_engine("onnxruntime").load(path)
    message = str(err.value)
    assert "output 'y'" in message
    assert "tensor(float8e4m3fn)" in message


# ---- the map's users: the load test's metadata specs (the bench's raw gRPC client: bench/tests) --


def test_loadtest_specs_from_metadata_use_the_map_and_refuse_unknown_datatypes() -> None:
    from loadtest.errors import ConfigError
    from loadtest.inputs import specs_from_metadata

    specs = specs_from_metadata([("ids", "INT64", [-1, 8]), ("x", "FP16", [-1, 3])], batched=True)
    assert [(s.name, s.dtype, s.shape) for s in specs] == [
        ("ids", "int64", (8,)),
        ("x", "float16", (3,)),
    ]
    with pytest.raises(ConfigError, match=r"input 'z'.*'FP8'"):
        specs_from_metadata([("z", "FP8", [4])], batched=False)
