"""The one map between numpy dtypes, KServe v2 datatypes and Triton config data types.

The KServe-v2 names come from ``tritonclient.utils`` (``np_to_triton_dtype`` /
``triton_to_np_dtype``), the config enum from ``model_config_pb2`` (``TYPE_`` + the same name).
A type with no equivalent is a :class:`DtypeError`, never a silent float32.
"""

from __future__ import annotations

import functools

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from common.model_repository.errors import DtypeError

DTypeLike = str | np.dtype | type


@functools.cache
def to_datatype(dtype: DTypeLike) -> str:
    """numpy dtype -> KServe v2 datatype (``float32`` -> ``FP32``, ``object`` -> ``BYTES``)."""
    try:
        np_dtype = np.dtype(dtype)
    except TypeError as e:
        raise DtypeError(f"{dtype!r} is not a numpy dtype") from e
    name = np_to_triton_dtype(np_dtype)
    if name is None:
        raise DtypeError(f"numpy dtype {np_dtype.name} has no KServe v2 / Triton equivalent")
    return name


@functools.cache
def from_datatype(datatype: str) -> np.dtype:
    """KServe v2 datatype -> numpy dtype (``BYTES`` -> ``object``)."""
    np_type = triton_to_np_dtype(datatype) if isinstance(datatype, str) else None
    if np_type is None:
        raise DtypeError(f"datatype {datatype!r} has no numpy equivalent here")
    return np.dtype(np_type)


def to_config_type(dtype: DTypeLike) -> int:
    """numpy dtype -> ``model_config_pb2.DataType`` (``float32`` -> ``TYPE_FP32``)."""
    name = "TYPE_" + ("STRING" if (d := to_datatype(dtype)) == "BYTES" else d)
    try:
        return mc.DataType.Value(name)
    except ValueError:
        raise DtypeError(f"dtype {np.dtype(dtype).name} has no Triton config type") from None


def from_config_type(data_type: int) -> np.dtype:
    """``model_config_pb2.DataType`` -> numpy dtype."""
    try:
        name = mc.DataType.Name(data_type)
    except ValueError:
        raise DtypeError(f"unknown Triton config data type {data_type}") from None
    datatype = name.removeprefix("TYPE_")
    return from_datatype("BYTES" if datatype == "STRING" else datatype)


def config_type_to_datatype(data_type: int) -> str:
    """``TYPE_FP32`` -> ``FP32`` (what the KServe v2 metadata calls it)."""
    return to_datatype(from_config_type(data_type))
