"""The short way through ModelInfer for the plain request (embedded upstream).

Most traffic is one shape of request: it names a variant (``digits_int8``, as perf_analyzer's
``-m`` and an explicit precision do), carries its inputs as ``raw_input_contents``, asks for all
outputs, has no parameters, no shared memory and no deadline. For such a request the general
path builds an :class:`~server.core.InferRequest` of wire tensors, checks them on their own, looks
the name up, routes, checks them against the variant and decodes them - about a tenth of a
millisecond of Python on these hosts, as much as a small model's run (docs/gateway.md).

:class:`FastLane` checks such a request against a per-variant :class:`Plan` (the variant's
input names, datatypes, dims, maximum dims, batch range and byte sizes, computed once) and
decodes it in one pass; :meth:`server.core.Gateway.infer_checked` then runs and records it as
:meth:`~server.core.Gateway.infer` would. It only ever accepts: anything it does not prove valid
(a wrong shape, a parameter, a typed-contents input, a logical model's name) gets ``None`` and
takes the general path, so every error keeps the general path's words and status.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from server.core import Gateway
from server.repository import Variant


@dataclass(frozen=True)
class InputPlan:
    name: str
    datatype: str
    dtype: np.dtype  # the variant's (native byte order)
    wire: np.dtype  # the same, little-endian (the wire's order)
    dims: tuple[int, ...]  # with the batch dimension as -1 when batched
    most: tuple[int, ...] | None  # the largest dims after the batch dimension (max_shape)


@dataclass(frozen=True)
class Plan:
    variant: Variant
    inputs: tuple[InputPlan, ...]
    by_name: dict[str, int]  # input name -> position in ``inputs``
    max_batch: int  # 0: no batch dimension


def plan_of(variant: Variant) -> Plan | None:
    """The variant's plan; None when its requests always take the general path (BYTES
    inputs, a variant that cannot be served)."""
    if variant.problem or not variant.inputs:
        return None
    batched = variant.max_batch_size > 0
    inputs = []
    for t in variant.inputs:
        if t.dtype == np.object_:
            return None
        inputs.append(
            InputPlan(
                name=t.name,
                datatype=t.datatype,
                dtype=t.dtype,
                wire=t.dtype.newbyteorder("<"),
                dims=((-1,) if batched else ()) + tuple(t.shape),
                most=t.max_shape,
            )
        )
    by_name = {p.name: i for i, p in enumerate(inputs)}
    return Plan(variant, tuple(inputs), by_name, variant.max_batch_size)


class FastLane:
    """Plans by variant name, made on first use; see the module docstring."""

    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway
        self._plans: dict[str, Plan | None] = {}

    def _plan(self, name: str) -> Plan | None:
        try:
            return self._plans[name]
        except KeyError:
            pass
        repository = self._gateway.repository
        # a logical model's name routes (general path); an unknown name is its error
        variant = None if name in repository.models else repository.variant(name)
        plan = self._plans[name] = plan_of(variant) if variant is not None else None
        return plan

    def arrays(self, request: pb.ModelInferRequest) -> tuple[Variant, dict[str, np.ndarray]] | None:
        """The variant and its decoded inputs (in the variant's order) when ``request`` is
        plain and valid for it; None otherwise (the caller takes the general path)."""
        if request.parameters or request.outputs or request.model_version not in ("", "1"):
            return None
        plan = self._plan(request.model_name)
        if plan is None:
            return None
        raws = request.raw_input_contents
        given = request.inputs
        count = len(plan.inputs)
        if len(given) != count or len(raws) != count:
            return None
        found: list[np.ndarray | None] = [None] * count
        batch = -1
        total = 0
        for t, raw in zip(given, raws, strict=True):
            i = plan.by_name.get(t.name)
            if i is None or found[i] is not None or t.parameters:
                return None
            spec = plan.inputs[i]
            shape = tuple(t.shape)
            if t.datatype != spec.datatype or not _fits(shape, spec):
                return None
            if plan.max_batch:
                rows = shape[0]
                if not 1 <= rows <= plan.max_batch or (batch != -1 and rows != batch):
                    return None
                batch = rows
            if len(raw) != math.prod(shape) * spec.dtype.itemsize:
                return None
            total += len(raw)
            found[i] = np.frombuffer(raw, spec.wire).astype(spec.dtype).reshape(shape)
        if total > self._gateway.max_request_bytes:
            return None
        return plan.variant, {s.name: a for s, a in zip(plan.inputs, found, strict=True)}


def _fits(shape: tuple[int, ...], spec: InputPlan) -> bool:
    if len(shape) != len(spec.dims):
        return False
    for want, got in zip(spec.dims, shape, strict=True):
        if got < 0 or (want != -1 and want != got):
            return False
    if spec.most is not None:
        tail = shape[len(shape) - len(spec.most) :]
        if any(g > m for g, m in zip(tail, spec.most, strict=True)):
            return False
    return True
