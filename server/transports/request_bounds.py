"""The largest valid request of a repository's models, to size the gRPC message limit.

gRPC hands a received message to Python as one ``bytes`` object: grpc.aio copies a 60 MB
message on the event loop's thread (~120 ms here, holding the GIL), before any handler - and so
any check of ours - can run. A message over ``grpc.max_receive_message_length`` is refused by
gRPC's C core instead, without reaching Python. So the gateway limits messages to what its models
can validly take: per model ``max_batch_size`` rows of every input at its largest shape (the
config's fixed dims; the manifest's ``max_shape`` for dynamic ones), each element at its largest
encoding (raw bytes, or a typed-contents varint: up to 10 bytes for a negative INT64/INT32).
When some input has a dynamic dim without a ``max_shape`` (or is BYTES), no such bound exists and
``--max-request-bytes`` alone limits the size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from server.catalog import Repository, TensorInfo, Variant
from server.dataplane.tensors import CONTENTS_FIELD

# Largest bytes one element takes on the wire, by typed-contents field (raw: its itemsize).
_VARINT_MAX = {
    "bool_contents": 1,
    "int_contents": 10,  # negative int32 values are sign-extended to 10 bytes
    "int64_contents": 10,
    "uint_contents": 5,
    "uint64_contents": 10,
}
LIMIT_MODES = ("models", "max-request-bytes")


@dataclass(frozen=True)
class RequestBound:
    """``largest``: bytes of the largest valid request of any model (None: unbounded).
    ``per_model``: each model's (None where unbounded); ``unbounded``: the inputs why."""

    largest: int | None
    per_model: dict[str, int | None] = field(default_factory=dict)
    unbounded: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = ", ".join(
            f"{m} {'unbounded' if b is None else _mb(b)}" for m, b in sorted(self.per_model.items())
        )
        return parts or "no models"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def element_bytes(tensor: TensorInfo) -> int | None:
    """The most one element of ``tensor`` takes in a ModelInferRequest (None: BYTES)."""
    datatype = tensor.datatype
    if datatype == "BYTES":
        return None
    raw = tensor.dtype.itemsize
    typed = _VARINT_MAX.get(CONTENTS_FIELD.get(datatype, ""), raw)
    return max(raw, typed)


def largest_dims(tensor: TensorInfo) -> tuple[int, ...] | None:
    if tensor.max_shape is not None:
        return tensor.max_shape
    if any(d < 0 for d in tensor.shape):
        return None
    return tensor.shape


def variant_bound(variant: Variant) -> tuple[int | None, list[str]]:
    """Bytes of the variant's largest valid request, and the inputs that leave it unbounded."""
    rows = max(variant.max_batch_size, 1)
    total, unbounded = 0, []
    for t in variant.inputs:
        dims, per = largest_dims(t), element_bytes(t)
        if dims is None or per is None:
            unbounded.append(f"{variant.model}.{t.name}")
            continue
        total += rows * math.prod(dims) * per
    return (None if unbounded else total), unbounded


def request_bound(repository: Repository) -> RequestBound:
    per_model: dict[str, int | None] = {}
    unbounded: list[str] = []
    for name, model in repository.models.items():
        sizes = []
        for variant in model.variants.values():
            size, why = variant_bound(variant)
            sizes.append(size)
            unbounded += [w for w in why if w not in unbounded]
        per_model[name] = None if None in sizes or not sizes else max(s or 0 for s in sizes)
    bounded = [b for b in per_model.values() if b is not None]
    largest = None if unbounded or not bounded else max(bounded)
    return RequestBound(largest, per_model, unbounded)


def payload_limit(bound: RequestBound, max_request_bytes: int, mode: str) -> int:
    """The request payload limit gRPC enforces: ``--max-request-bytes``, lowered to the
    models' largest valid request in mode ``models`` when there is one."""
    if mode not in LIMIT_MODES:
        raise ValueError(f"message limit mode must be one of {LIMIT_MODES}, got {mode!r}")
    if mode == "models" and bound.largest is not None:
        return min(max_request_bytes, bound.largest)
    return max_request_bytes


# ``--grpc-max-concurrent-rpcs auto``: as many calls as fit this many bytes of messages at the
# gRPC message limit, within [MIN, MAX] calls (bounded payloads allow more calls in flight).
INFLIGHT_BUDGET_BYTES = 8 * 1024**3
MIN_CONCURRENT_RPCS, MAX_CONCURRENT_RPCS = 128, 4096


def concurrent_rpcs(message_bytes: int) -> int:
    """The default cap on gRPC calls in flight for messages of at most ``message_bytes``."""
    fits = INFLIGHT_BUDGET_BYTES // max(message_bytes, 1)
    return int(min(MAX_CONCURRENT_RPCS, max(MIN_CONCURRENT_RPCS, fits)))
