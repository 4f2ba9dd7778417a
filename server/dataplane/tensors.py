"""Tensors on the wire (KServe v2) <-> numpy, with errors that name the input.

Both transports turn a request tensor into a :class:`WireTensor` (name, datatype, shape and either
raw little-endian bytes or a flat list of values); the core checks datatype and shape against the
variant first, then decodes, so a client hears about the real problem (wrong dtype beats a byte
count mismatch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.model_repository.dtypes import from_datatype, to_datatype
from common.model_repository.errors import DtypeError
from server.dataplane import wording
from server.errors import InvalidInput

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


@dataclass
class WireTensor:
    name: str
    datatype: str
    shape: list[int]
    raw: bytes | None = None  # raw_input_contents / binary extension
    # typed contents (server/transports/grpc/contents.py: lazy, ``__array__``) / JSON "data"
    values: Sequence[Any] | np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        if self.raw is not None:
            return len(self.raw)
        if self.values is None:
            return 0
        try:
            size = from_datatype(self.datatype).itemsize
        except DtypeError:
            size = 8
        return len(self.values) * size if hasattr(self.values, "__len__") else 0


def element_count(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _flatten(values: Any) -> list[Any]:
    out: list[Any] = []
    stack = [values]
    while stack:
        v = stack.pop()
        if isinstance(v, list | tuple):
            stack.extend(reversed(v))
        else:
            out.append(v)
    return out


def decode(t: WireTensor, model: str = "", request_id: str = "") -> np.ndarray:
    """A numpy array of ``t``'s declared datatype and shape; InvalidInput when it cannot be
    (raw bytes of the wrong size in Triton's words, naming ``model`` and the request)."""
    try:
        dtype = from_datatype(t.datatype)
    except DtypeError:
        raise InvalidInput(f"input {t.name!r}: unknown datatype {t.datatype!r}") from None
    if any(d < 0 for d in t.shape):
        raise InvalidInput(f"input {t.name!r}: shape {list(t.shape)} has a negative dimension")
    count = element_count(t.shape)
    if t.raw is not None:
        if t.datatype == "BYTES":
            from tritonclient.utils import deserialize_bytes_tensor

            try:
                arr = deserialize_bytes_tensor(t.raw)
            except Exception as e:
                raise InvalidInput(f"input {t.name!r}: malformed BYTES contents ({e})") from e
            if arr.size != count:
                raise InvalidInput(
                    f"input {t.name!r}: {arr.size} strings do not match shape {list(t.shape)} "
                    f"(expected {count})"
                )
            return arr.reshape(t.shape)
        expected = count * dtype.itemsize
        if len(t.raw) != expected:
            raise InvalidInput(
                wording.byte_size(request_id, t.name, model, expected, len(t.raw), t.shape)
            )
        return np.frombuffer(t.raw, dtype=dtype.newbyteorder("<")).astype(dtype).reshape(t.shape)
    values = t.values if t.values is not None else []
    if not isinstance(values, np.ndarray) and not hasattr(values, "__array__"):
        values = _flatten(list(values) if isinstance(values, list | tuple) else [values])
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # out-of-range -> inf, as numpy casts
            arr = np.asarray(values, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidInput(f"input {t.name!r}: values are not {t.datatype}: {e}") from e
    if arr.size != count:
        raise InvalidInput(
            f"input {t.name!r}: got {arr.size} values, expected {count} for shape {list(t.shape)}"
        )
    return arr.reshape(t.shape)


def encode_raw(arr: np.ndarray) -> bytes:
    """Raw little-endian bytes as Triton sends them (BYTES: 4-byte length-prefixed items)."""
    if arr.dtype == np.object_:
        from tritonclient.utils import serialize_byte_tensor

        serialized = serialize_byte_tensor(arr)
        return serialized.item() if serialized.size else b""
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def datatype_of(arr: np.ndarray) -> str:
    return to_datatype(arr.dtype)
