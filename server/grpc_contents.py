"""gRPC request tensors -> :class:`server.tensors.WireTensor`, checked before anything is copied.

A ``ModelInferRequest`` carries each input either in ``raw_input_contents`` or in typed
``InferTensorContents`` fields (``fp32_contents`` ...). Both are checked against the tensor's
own declared shape and datatype first - the length of a repeated field is O(1) - so a 60 MB
payload declaring shape [1, 16] is refused at once, naming the input, expected vs got.

Typed contents stay lazy (:class:`TypedContents`) until the core has checked the tensor against
the variant, and are then converted without building Python lists: fixed-width fields
(``fp32_contents``, ``fp64_contents``) are serialised by protobuf (a copy at memory speed) and
read with ``np.frombuffer``; the varint fields (``int_contents`` ...) go through ``np.fromiter``,
whose size the variant's shape bounds by then.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from server.errors import InvalidInput
from server.model_repository.dtypes import from_datatype
from server.model_repository.errors import DtypeError
from server.tensors import WireTensor, element_count

# The most a tensor can hold: gRPC messages are limited to 2 GiB.
MAX_TENSOR_BYTES = 2**31

# KServe datatype -> InferTensorContents field for typed (non-raw) contents.
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# Fields serialised as packed little-endian fixed-width values: read with np.frombuffer.
_FIXED = {"fp32_contents": np.dtype("<f4"), "fp64_contents": np.dtype("<f8")}
# The numpy type each varint field's values have.
_VARINT = {
    "bool_contents": np.dtype(np.bool_),
    "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64),
    "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64),
}
_NUMBER = {f.name: f.number for f in pb.InferTensorContents.DESCRIPTOR.fields}


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise InvalidInput("malformed typed contents (truncated varint)")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7


def packed_field(buf: bytes, number: int) -> memoryview:
    """The payload of packed field ``number`` in a serialised ``InferTensorContents`` (every
    field there is repeated, so each is one length-delimited record, in field-number order)."""
    view = memoryview(buf)
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        if key & 7 != 2:
            raise InvalidInput("malformed typed contents (unexpected wire type)")
        length, pos = _read_varint(buf, pos)
        if key >> 3 == number:
            return view[pos : pos + length]
        pos += length
    return view[0:0]


class TypedContents:
    """One input's typed contents: ``len()`` without copying, numpy on demand (``__array__``)."""

    def __init__(self, contents: pb.InferTensorContents, field: str) -> None:
        self._contents = contents
        self._field = field
        self._values = getattr(contents, field)

    def __len__(self) -> int:
        return len(self._values)

    def to_numpy(self) -> np.ndarray:
        fixed = _FIXED.get(self._field)
        if fixed is not None:
            data = packed_field(self._contents.SerializeToString(), _NUMBER[self._field])
            return np.frombuffer(data, dtype=fixed).astype(fixed.newbyteorder("="))
        if self._field == "bytes_contents":
            arr = np.empty(len(self._values), dtype=np.object_)
            arr[:] = list(self._values)
            return arr
        return np.fromiter(self._values, dtype=_VARINT[self._field], count=len(self._values))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.to_numpy()
        if dtype is None or arr.dtype == dtype:
            return arr
        target = np.dtype(dtype)
        if target.kind in "iu" and arr.dtype.kind in "iu" and arr.size:
            info = np.iinfo(target)
            low, high = arr.min(), arr.max()
            if low < info.min or high > info.max:
                raise OverflowError(f"values {low}..{high} are out of range for {target}")
        return arr.astype(target)


def _shape(t: pb.ModelInferRequest.InferInputTensor) -> list[int]:
    shape = [int(d) for d in t.shape]
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {t.name!r}: shape {shape} has a negative dimension")
    try:
        itemsize = from_datatype(t.datatype).itemsize if t.datatype != "BYTES" else 4
    except DtypeError:
        itemsize = 1  # an unknown datatype is reported by the core, naming the expected one
    if math.prod(max(d, 1) for d in shape) * itemsize > MAX_TENSOR_BYTES:
        raise InvalidInput(
            f"input {t.name!r}: shape {shape} of {t.datatype} describes more than "
            f"{MAX_TENSOR_BYTES} bytes (a dimension is too large)"
        )
    return shape


def _check_raw(t: pb.ModelInferRequest.InferInputTensor, size: int, count: int) -> None:
    if t.datatype == "BYTES":
        return  # length-prefixed strings: counted when decoded
    try:
        itemsize = from_datatype(t.datatype).itemsize
    except DtypeError:
        return  # reported by the core
    if size != count * itemsize:
        raise InvalidInput(
            f"input {t.name!r}: got {size} bytes, expected {count * itemsize} for shape "
            f"{list(t.shape)} of {t.datatype} (raw_input_contents)"
        )


def wire_tensors(request: pb.ModelInferRequest) -> list[WireTensor]:
    """The request's inputs, each checked against its own shape and datatype (no conversion)."""
    raw = request.raw_input_contents
    if len(raw) and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs"
        )
    out = []
    for i, t in enumerate(request.inputs):
        shape = _shape(t)
        count = element_count(shape)
        wt = WireTensor(name=t.name, datatype=t.datatype, shape=shape)
        if len(raw):
            data = raw[i]
            _check_raw(t, len(data), count)
            wt.raw = data
        else:
            field = CONTENTS_FIELD.get(t.datatype)
            if field is None:
                raise InvalidInput(
                    f"input {t.name!r}: {t.datatype} needs raw_input_contents (no typed contents)"
                )
            values = TypedContents(t.contents, field)
            if len(values) != count:
                raise InvalidInput(
                    f"input {t.name!r}: got {len(values)} values, expected {count} for shape "
                    f"{shape} of {t.datatype} ({field})"
                )
            wt.values = values
        out.append(wt)
    return out
