"""gRPC request tensors -> :class:`server.dataplane.tensors.WireTensor`, checked before anything is
copied.

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

from common.model_repository.dtypes import from_datatype
from common.model_repository.errors import DtypeError
from server.dataplane import wording
from server.dataplane.tensors import CONTENTS_FIELD, WireTensor, element_count
from server.errors import InvalidInput

# The most a tensor can hold: gRPC messages are limited to 2 GiB.
MAX_TENSOR_BYTES = 2**31

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


def varint(n: int) -> bytes:
    """``n`` as a protobuf base-128 varint (for replies built from serialised parts)."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint_at(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; InvalidInput when malformed."""
    return _read_varint(buf, pos)


def _read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
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
        if shift > 63:  # at most 10 bytes
            raise InvalidInput("malformed typed contents (varint too long)")


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


def _check_shape(name: str, datatype: str, shape: list[int]) -> None:
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape {shape} has a negative dimension")
    try:
        itemsize = from_datatype(datatype).itemsize if datatype != "BYTES" else 4
    except DtypeError:
        itemsize = 1  # an unknown datatype is reported by the core, naming the expected one
    if math.prod(max(d, 1) for d in shape) * itemsize > MAX_TENSOR_BYTES:
        raise InvalidInput(
            f"input {name!r}: shape {shape} of {datatype} describes more than "
            f"{MAX_TENSOR_BYTES} bytes (a dimension is too large)"
        )


def _check_raw(
    name: str, datatype: str, shape: list[int], size: int, model: str, request_id: str
) -> None:
    if datatype == "BYTES":
        return  # length-prefixed strings: counted when decoded
    try:
        itemsize = from_datatype(datatype).itemsize
    except DtypeError:
        return  # reported by the core
    expected = element_count(shape) * itemsize
    if size != expected:  # Triton's words (server/dataplane/wording.py)
        raise InvalidInput(wording.byte_size(request_id, name, model, expected, size, shape))


def _check_count(name: str, datatype: str, shape: list[int], field: str, got: int) -> None:
    count = element_count(shape)
    if got != count:
        raise InvalidInput(
            f"input {name!r}: got {got} values, expected {count} for shape {shape} of "
            f"{datatype} ({field})"
        )


def _check_raw_entries(raw: int, inputs: int, in_shm: int = 0) -> None:
    if raw and raw != inputs - in_shm:
        where = " not in shared memory" if in_shm else ""
        raise InvalidInput(
            f"raw_input_contents has {raw} entries for {inputs - in_shm} inputs{where}"
        )


def wire_tensors(
    request: pb.ModelInferRequest, preset: dict[int, WireTensor] | None = None
) -> list[WireTensor]:
    """The request's inputs, each checked against its own shape and datatype (no conversion).
    ``preset``: inputs already decoded by position (those in shared memory); raw_input_contents
    then holds entries for the others only, as Triton has it."""
    preset = preset or {}
    raw = request.raw_input_contents
    _check_raw_entries(len(raw), len(request.inputs), len(preset))
    out = []
    raws = iter(raw)
    for i, t in enumerate(request.inputs):
        if i in preset:
            out.append(preset[i])
            continue
        shape = [int(d) for d in t.shape]
        _check_shape(t.name, t.datatype, shape)
        wt = WireTensor(name=t.name, datatype=t.datatype, shape=shape)
        if len(raw):
            data = next(raws)
            _check_raw(t.name, t.datatype, shape, len(data), request.model_name, request.id)
            wt.raw = data
        else:
            field = CONTENTS_FIELD.get(t.datatype)
            if field is None:
                raise InvalidInput(
                    f"input {t.name!r}: {t.datatype} needs raw_input_contents (no typed contents)"
                )
            values = TypedContents(t.contents, field)
            _check_count(t.name, t.datatype, shape, field, len(values))
            wt.values = values
        out.append(wt)
    return out


# ---- before parsing: sizes read off the serialised request ---------------------------------------
PREFLIGHT_BYTES = 1 << 20  # requests at least this big are scanned before they are parsed
_MAX_FIELDS = 10_000  # a scan visiting more fields than this gives up (the parser takes over)
_IN = {f.name: f.number for f in pb.ModelInferRequest.InferInputTensor.DESCRIPTOR.fields}
_REQ = {f.name: f.number for f in pb.ModelInferRequest.DESCRIPTOR.fields}


class _GiveUp(Exception):
    """The scan met something it does not read cheaply; the full parse decides."""


def _walk(view: memoryview) -> Any:
    """(field number, wire type, payload) of each field: a memoryview for length-delimited
    fields, an int for varints; fixed-width payloads are skipped (None)."""
    pos, seen, buf = 0, 0, view  # indexing a memoryview of bytes gives ints: nothing copied
    while pos < len(buf):
        seen += 1
        if seen > _MAX_FIELDS:
            raise _GiveUp
        try:
            key, pos = _read_varint(buf, pos)
            wire = key & 7
            if wire == 0:
                value, pos = _read_varint(buf, pos)
                yield key >> 3, wire, value
            elif wire == 2:
                length, pos = _read_varint(buf, pos)
                if pos + length > len(buf):
                    raise _GiveUp
                yield key >> 3, wire, view[pos : pos + length]
                pos += length
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
                yield key >> 3, wire, None
            else:
                raise _GiveUp
        except InvalidInput:
            raise _GiveUp from None


def _varints(view: memoryview) -> list[int]:
    if len(view) > 1024:
        raise _GiveUp
    out, pos, buf = [], 0, bytes(view)
    while pos < len(buf):
        try:
            v, pos = _read_varint(buf, pos)
        except InvalidInput:
            raise _GiveUp from None
        out.append(v - (1 << 64) if v >= 1 << 63 else v)
    return out


def _typed_counts(view: memoryview) -> dict[str, int]:
    counts: dict[str, int] = {}
    names = {n: f for f, n in _NUMBER.items()}
    for number, wire, payload in _walk(view):
        field = names.get(number)
        if field is None or field == "bytes_contents" or wire != 2:
            raise _GiveUp  # strings, unpacked values: counted after parsing
        if field in _FIXED:
            n = len(payload) // _FIXED[field].itemsize
        else:  # one varint ends at each byte below 0x80
            n = int(np.count_nonzero(np.frombuffer(payload, np.uint8) < 0x80))
        counts[field] = counts.get(field, 0) + n
    return counts


def _scan_input(view: memoryview) -> tuple[str, str, list[int], dict[str, int]]:
    name, datatype, shape, counts = "", "", [], {}
    for number, wire, payload in _walk(view):
        if number == _IN["name"] and wire == 2:
            name = bytes(payload).decode(errors="replace")
        elif number == _IN["datatype"] and wire == 2:
            datatype = bytes(payload).decode(errors="replace")
        elif number == _IN["shape"]:
            shape += _varints(payload) if wire == 2 else [payload]
        elif number == _IN["parameters"]:
            raise _GiveUp  # shared memory parameters change what raw entries hold: after parsing
        elif number == _IN["contents"] and wire == 2:
            for field, n in _typed_counts(payload).items():
                counts[field] = counts.get(field, 0) + n
    return name, datatype, shape, counts


def check_sizes(data: bytes) -> None:
    """For a large serialised ``ModelInferRequest``: the checks of :func:`wire_tensors`, read
    off the bytes without parsing (and copying) them, so that a payload not matching its own
    declared shapes is refused at the cost of a scan. Anything the scan does not read cheaply
    (unpacked values, strings) is left to the parse that follows."""
    if len(data) < PREFLIGHT_BYTES:
        return
    inputs, raw_sizes = [], []
    model = request_id = ""
    try:
        for number, wire, payload in _walk(memoryview(data)):
            if number == _REQ["model_name"] and wire == 2:
                model = bytes(payload).decode(errors="replace")
            elif number == _REQ["id"] and wire == 2:
                request_id = bytes(payload).decode(errors="replace")
            elif number == _REQ["inputs"] and wire == 2:
                inputs.append(_scan_input(payload))
            elif number == _REQ["raw_input_contents"] and wire == 2:
                raw_sizes.append(len(payload))
    except _GiveUp:
        return
    _check_raw_entries(len(raw_sizes), len(inputs))
    for i, (name, datatype, shape, counts) in enumerate(inputs):
        _check_shape(name, datatype, shape)
        if raw_sizes:
            _check_raw(name, datatype, shape, raw_sizes[i], model, request_id)
            continue
        field = CONTENTS_FIELD.get(datatype)
        if field is not None:
            _check_count(name, datatype, shape, field, counts.get(field, 0))
