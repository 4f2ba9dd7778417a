"""The short way into ModelInfer for the plain request (a decoding upstream, e.g. embedded).

Most traffic is one shape of request: it names a variant (``digits_int8``, as perf_analyzer's ``-m``
and an explicit precision do), carries its inputs as ``raw_input_contents``, asks for all outputs,
has no parameters and no shared memory (a deadline is fine). For any other request the transport
builds wire tensors, and the core checks and decodes them against the routed variant.

:class:`FastLane` checks such a request against a per-variant :class:`Plan` (the variant's input
names, datatypes, dims, maximum dims, batch range and byte sizes, computed once; the shape check is
the core's own :meth:`~server.dataplane.gateway.Gateway.check_shape`) and decodes it in one pass
into the ``arrays`` of an :class:`~server.dataplane.gateway.InferRequest`; the core then takes it
along its one inference path (lookup, run, record, count) without checking it again. It only ever
accepts: anything it does not prove valid (a wrong shape, a parameter, a typed-contents input, a
logical model's name) gets ``None`` and goes the general way, so every error keeps the core's
words and status.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tritonclient.grpc import service_pb2 as pb

from server.catalog import TensorInfo, Variant
from server.dataplane.gateway import Gateway
from server.errors import InvalidInput


@dataclass(frozen=True)
class InputPlan:
    info: TensorInfo
    datatype: str
    wire: np.dtype  # the variant's dtype, little-endian (the wire's order)


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
    if any(t.dtype == np.object_ for t in variant.inputs):
        return None
    inputs = [InputPlan(t, t.datatype, t.dtype.newbyteorder("<")) for t in variant.inputs]
    by_name = {p.info.name: i for i, p in enumerate(inputs)}
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
        # a logical model's name routes (general path); an unknown name is its error there, and
        # is not kept here (clients' made-up names would grow this without bound)
        variant = None if name in repository.models else repository.variant(name)
        if variant is None:
            return None
        plan = self._plans[name] = plan_of(variant)
        return plan

    def arrays(self, request: pb.ModelInferRequest) -> dict[str, np.ndarray] | None:
        """The decoded inputs (in the order of the variant the request names) when ``request``
        is plain and valid for that variant; None otherwise (the caller goes the general way)."""
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
            if t.datatype != spec.datatype:
                return None
            shape = list(t.shape)
            try:  # the core's own check: rank, dims, max_shape, batch range
                Gateway.check_shape(plan.variant, spec.info, shape, plan.max_batch > 0)
            except InvalidInput:
                return None
            if plan.max_batch:
                if batch != -1 and shape[0] != batch:
                    return None
                batch = shape[0]
            if len(raw) != math.prod(shape) * spec.info.dtype.itemsize:
                return None
            total += len(raw)
            found[i] = np.frombuffer(raw, spec.wire).astype(spec.info.dtype).reshape(shape)
        if total > self._gateway.max_request_bytes:
            return None
        return {s.info.name: a for s, a in zip(plan.inputs, found, strict=True)}
