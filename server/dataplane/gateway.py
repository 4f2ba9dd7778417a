"""The data plane: one place that validates, routes, runs, falls back and records metrics.

The gRPC servicer and the HTTP handlers only translate their wire formats into
:class:`InferRequest` / out of :class:`InferResponse` and :class:`GatewayError` into a status.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from server import metrics
from server.catalog import LLM, Model, Repository, TensorInfo, Variant
from server.dataplane import wording
from server.dataplane.restricted import Access
from server.dataplane.shared_memory import SystemSharedMemory
from server.dataplane.tensors import WireTensor, decode
from server.errors import (
    DeadlineExceeded,
    GatewayError,
    InternalError,
    InvalidInput,
    InvalidVersion,
    ModelNotFound,
    PayloadTooLarge,
    Unauthenticated,
    Unavailable,
    Unsupported,
)
from server.routing.policies import Decision, Router, ShadowPolicy
from server.upstreams.base import Upstream, UpstreamUnavailable

_T = TypeVar("_T")
log = logging.getLogger(__name__)

PRECISION_PARAMETER = "precision"
FALLBACK_PARAMETER = "fallback_from"  # response parameter: the precision that was unready
PRECISION_HEADER = "x-precision"
REQUEST_KEY = "x-request-key"
TIMEOUT_PARAMETER = "timeout"  # microseconds, as tritonclient's ``timeout=`` sends it
MAX_SHADOW_TASKS = 8  # shadow comparisons in flight; samples beyond are dropped (counted)
SHADOW_HEADER = "x-ps-shadow"  # on a sample the Envoy front mirrored (its value: shadow_token)


@dataclass
class InferRequest:
    model: str
    inputs: list[WireTensor]
    version: str = ""
    id: str = ""
    outputs: list[str] | None = None  # requested output names (None = all)
    parameters: Mapping[str, Any] = field(default_factory=dict)
    headers: Mapping[str, str] = field(default_factory=dict)  # lower-case names
    deadline: float | None = None  # absolute time.monotonic()
    protocol: str = "grpc"
    # The body comes in one of three forms; the path through the core is the same for all:
    # - ``inputs``: wire tensors, checked against the routed variant and decoded here;
    # - ``arrays``: inputs the transport already checked against the variant ``model`` names,
    #   with the same checks (server/transports/grpc/fast_lane.py), decoded in its order;
    # - ``payload`` (an upstream that declares ``forward``): the serialised ModelInferRequest,
    #   the rows of its batch, and how to get ``inputs`` after all (a shadow comparison needs
    #   the arrays).
    arrays: dict[str, np.ndarray] | None = None
    payload: bytes | None = None
    rows: int = 1
    decode_inputs: Callable[[], list[WireTensor]] | None = None


@dataclass
class InferResponse:
    model_name: str  # the variant's Triton name
    model_version: str
    precision: str
    id: str
    outputs: dict[str, np.ndarray]  # in the variant's output order
    raw: bytes | None = None  # pass-through: the upstream's serialised reply (outputs empty)
    fallback_from: str = ""  # the precision routing chose, when another one served (fallback)


@dataclass
class VariantStats:
    """What ModelStatistics reports (Triton's InferStatistics subset the gateway knows)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    inference_count: int = 0  # rows
    execution_count: int = 0
    last_inference_ms: int = 0


def from_triton(entries: Iterable[Any], names: Iterable[str]) -> dict[str, VariantStats]:
    """Triton's ModelStatistics entries (of several replicas) summed per model, for ``names``."""
    wanted = set(names)
    out = {name: VariantStats() for name in wanted}
    for e in entries:
        if e.name not in wanted:
            continue
        s, i = out[e.name], e.inference_stats
        s.success_count += i.success.count
        s.success_ns += i.success.ns
        s.fail_count += i.fail.count
        s.fail_ns += i.fail.ns
        s.inference_count += e.inference_count
        s.execution_count += e.execution_count
        s.last_inference_ms = max(s.last_inference_ms, e.last_inference)
    return out


def combined(parts: Iterable[VariantStats]) -> VariantStats:
    """The sum of several variants' counters (a logical model's statistics entry)."""
    out = VariantStats()
    for s in parts:
        out.success_count += s.success_count
        out.success_ns += s.success_ns
        out.fail_count += s.fail_count
        out.fail_ns += s.fail_ns
        out.inference_count += s.inference_count
        out.execution_count += s.execution_count
        out.last_inference_ms = max(out.last_inference_ms, s.last_inference_ms)
    return out


@dataclass(frozen=True)
class ModelView:
    """What metadata endpoints show for a name (logical model or variant)."""

    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


def _refuse_past(deadline: float | None, now: float | None = None) -> None:
    """DEADLINE_EXCEEDED for a request whose deadline (a ``time.monotonic()`` instant) has
    passed before it was routed."""
    if deadline is not None and (time.monotonic() if now is None else now) >= deadline:
        raise DeadlineExceeded("deadline exceeded before the request was routed")


class Gateway:
    def __init__(
        self,
        repository: Repository,
        router: Router,
        upstream: Upstream,
        max_request_bytes: int = 64 * 1024 * 1024,
        auth_token: str | None = None,
        restricted: frozenset[str] = frozenset(),
    ) -> None:
        self.auth_token = auth_token
        self.restricted = (
            restricted  # API groups that need the token too (server/dataplane/restricted.py)
        )
        self.repository = repository
        self.router = router
        self.upstream = upstream
        self.max_request_bytes = max_request_bytes
        self.stats: dict[str, VariantStats] = {
            v.name: VariantStats() for v in repository.variants()
        }
        for name in repository.models:  # exported at 0 from start-up (the HPA's series)
            metrics.inflight(name)
        self._shadow_tasks: set[asyncio.Task] = set()
        # the Envoy front's mark on the samples it mirrors here (``is_shadow``); None: no front
        self.shadow_token: str | None = None
        # pass-through: the upstream takes serialised requests (server/upstreams/triton/upstream.py)
        self.forwards = upstream.capabilities.forward
        # (variant names, fetch Triton's statistics entries): set by the app when the Envoy front
        # sends those variants' inference to the replicas directly (``statistics``)
        self.served_elsewhere: tuple[frozenset[str], Callable[[], Awaitable[list[Any]]]] | None = (
            None
        )
        self._started = False
        self._draining = False
        self.shared_memory = SystemSharedMemory()  # Triton's system shared memory regions
        # variants unloaded through the model repository API (server/dataplane/model_control.py):
        # not expected up, so they do not make the server unready
        self.unloaded: set[str] = set()

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        await self.upstream.start()
        self._started = True

    def drain(self) -> None:
        """Stop reporting ready (load balancers move away) while in-flight requests finish."""
        self._draining = True

    async def close(self) -> None:
        for task in list(self._shadow_tasks):
            task.cancel()
        await asyncio.gather(*self._shadow_tasks, return_exceptions=True)
        await self.upstream.close()
        self.shared_memory.close()

    # ---- health and metadata ------------------------------------------------------------------
    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        if not self._started or self._draining:
            return False
        return all(
            self._model_ready(m)
            for m in self.repository.models.values()
            if not all(v.name in self.unloaded for v in m.variants.values())
        )

    def add_variant(self, variant: Variant) -> None:
        """A variant the builder added after start-up (model control found it in the manifests):
        counted from now on, unloaded until it is loaded."""
        self.stats.setdefault(variant.name, VariantStats())
        self.unloaded.add(variant.name)

    def _model_ready(self, model: Model) -> bool:
        return any(self.upstream.ready(v) for v in model.variants.values())

    def model_ready(self, name: str, version: str = "") -> bool:
        target = self.lookup(name, version)
        if self._draining:
            return False
        if isinstance(target, Model):
            return self._started and self._model_ready(target)
        return self._started and self.upstream.ready(target)

    def lookup(self, name: str, version: str = "") -> Model | Variant:
        """The logical model or variant ``name`` names; Triton's errors
        (server/dataplane/wording.py) for an unknown name (before the version, as Triton) or a
        version other than 1."""
        target: Model | Variant | None = self.repository.models.get(name)
        if target is None:
            target = self.repository.variant(name)
        if target is None:  # no listing: the repository index says what is served
            raise ModelNotFound(wording.unknown_model(name))
        if version not in ("", "1"):
            _check_version(name, version)
        return target

    def metadata(self, name: str, version: str = "") -> ModelView:
        target = self.lookup(name, version)
        variant = target.reference() if isinstance(target, Model) else target
        return ModelView(
            name=name,
            versions=[variant.version],
            platform=variant.config.platform or variant.config.backend,
            inputs=variant.inputs,
            outputs=variant.outputs,
        )

    def default_variant(self, model: Model) -> Variant:
        return model.variants[self.router.policies[model.name].default_precision]

    def config(self, name: str, version: str = "") -> mc.ModelConfig:
        target = self.lookup(name, version)
        variant = self.default_variant(target) if isinstance(target, Model) else target
        cfg = mc.ModelConfig()
        cfg.CopyFrom(variant.config)
        cfg.name = name
        if not cfg.HasField("version_policy"):  # what Triton fills in: the one version, "1"
            cfg.version_policy.latest.num_versions = 1
        return cfg

    async def statistics(self, name: str = "", version: str = "") -> dict[str, VariantStats]:
        """Triton's entries (server/dataplane/statistics.py): every variant and logical model, one
        variant's, or a logical model's single entry (counts summed over its variants). The
        variants another data plane serves (``served_elsewhere``: the Envoy front sends their
        inference straight to Triton) report the replicas' own counts, summed, instead of this
        process's (Triton also counts what this process forwards to it)."""
        stats = self.stats
        if self.served_elsewhere is not None:
            names, fetch = self.served_elsewhere
            stats = {**self.stats, **from_triton(await fetch(), names)}

        def logical(model: Model) -> VariantStats:
            return combined(stats[v.name] for v in model.variants.values())

        if not name:
            out = {v.name: stats[v.name] for v in self.repository.variants()}
            out.update({m.name: logical(m) for m in self.repository.models.values()})
            return out
        try:
            target = self.lookup(name, version)
        except ModelNotFound:  # Triton's words and status for statistics (INVALID_ARGUMENT)
            if name in self.repository.models or self.repository.variant(name) is not None:
                raise InvalidInput(wording.statistics_unknown_version(name)) from None
            raise InvalidInput(wording.statistics_unknown_model(name)) from None
        if isinstance(target, Model):
            return {target.name: logical(target)}
        return {target.name: stats[target.name]}

    def index(self) -> list[tuple[str, str, str, str]]:
        """(name, version, state, reason) for logical models and variants."""
        rows = []
        for model in self.repository.models.values():
            ok = self._started and self._model_ready(model)
            # the policy's note, e.g. why auto serves fp32 (server/routing/evidence.py)
            note = self.router.policies[model.name].reason
            rows.append((model.name, "1", "READY" if ok else "UNAVAILABLE", note))
            for v in model.variants.values():
                ok = self._started and self.upstream.ready(v)
                reason = "" if ok else (v.problem or self.upstream.problem(v))
                rows.append((v.name, v.version, "READY" if ok else "UNAVAILABLE", reason))
        return rows

    # ---- inference ---------------------------------------------------------------------------
    async def infer(self, request: InferRequest) -> InferResponse:
        """The one inference path, whatever the request's body form (see :class:`InferRequest`):
        look up, route, check and decode (unless done), run on the first ready candidate
        (fallback), record, count. The transport has authorized the call (:meth:`admit`)."""
        start = time.monotonic()
        model_label, precision_label = "unknown", "none"
        inflight = None
        feedback = None  # the policy's observe() when it routed this request (slo)
        counts = False  # this request's time is a serving time the policy should learn from
        try:
            target = self.lookup(request.model, request.version)
            model = self.repository.models[target.model] if isinstance(target, Variant) else target
            model_label = model.name
            if model.kind == LLM:  # Triton refuses one-response calls to decoupled models
                raise Unsupported(wording.decoupled_refused(request.protocol))
            inflight = metrics.inflight(model_label)
            inflight.inc()
            deadline = self._deadline(request)
            if isinstance(target, Variant):
                decision = Decision(target.precision, "variant")
                candidates = [target.precision]
            else:
                decision = self._decide(model, request)
                if decision.policy == self.router.policies[model.name].name:
                    feedback = self.router.feedback(model.name)
                candidates = self.router.candidates(model.name, decision.precision)
            precision_label = decision.precision
            variant, outputs, raw, rows = await self._serve(
                model, decision, candidates, request, deadline
            )
            precision_label = variant.precision
            self._count_routing(model, target, decision, variant)
            self._record(variant, rows if variant.max_batch_size > 0 else 1, start, ok=True)
            metrics.requests(model_label, precision_label, request.protocol, "ok").inc()
            counts = True
            return InferResponse(
                model_name=variant.name,
                model_version=variant.version,
                precision=variant.precision,
                id=request.id,
                outputs=outputs,
                raw=raw,
                fallback_from=_fell_back(decision, variant),
            )
        except (Exception, asyncio.CancelledError) as e:
            error = _counted_failure(
                e, model_label, precision_label, request.protocol, request.deadline
            )
            counts = isinstance(e, DeadlineExceeded | asyncio.CancelledError)
            if error is e:
                raise
            raise error from e
        finally:
            if inflight is not None:
                inflight.dec()
                elapsed = time.monotonic() - start
                metrics.request_duration(model_label, precision_label).observe(elapsed)
                if feedback is not None:
                    feedback(precision_label, elapsed, counts)

    async def _serve(
        self,
        model: Model,
        decision: Decision,
        candidates: list[str],
        request: InferRequest,
        deadline: float | None,
    ) -> tuple[Variant, dict[str, np.ndarray], bytes | None, int]:
        """Run ``request`` on the first ready candidate: its bytes where the upstream forwards
        them (and nothing needs the arrays), its checked arrays otherwise. Returns the variant
        that served, the selected outputs (empty when forwarded), the upstream's serialised
        reply (forwarded only) and the request's rows."""
        if request.payload is not None and (decision.shadow_reference or not self.forwards):
            request.inputs = request.decode_inputs() if request.decode_inputs else []
            request.payload = None  # a shadow needs the arrays: decode after all
        payload = request.payload
        if payload is not None:
            if len(payload) > self.max_request_bytes:
                raise PayloadTooLarge(
                    f"request is {len(payload)} bytes, over the limit of {self.max_request_bytes}"
                )
            forward = self.upstream.forward
            variant, raw = await self._first_ready(
                model, candidates, lambda v: forward(v, payload, deadline), deadline
            )
            return variant, {}, raw, request.rows
        arrays = request.arrays
        if arrays is None:
            self._check_size(request)
            arrays = self._validate(model.variants[decision.precision], request)
        infer = self.upstream.infer
        variant, outputs = await self._first_ready(
            model, candidates, lambda v: infer(v, arrays, deadline), deadline
        )
        if decision.shadow_reference and variant.precision == decision.precision:
            self._mirror(model, variant, decision.shadow_reference, arrays, outputs)
        selected = self._select_outputs(variant, outputs, request.outputs)
        return variant, selected, None, _rows(variant, arrays)

    def count_rejected(self, model: str, protocol: str, error: BaseException) -> None:
        """Count an inference call that a transport rejected before the core saw it (a parse,
        auth or size error): ``precision_serve_requests_total`` then counts every call."""
        if isinstance(error, GatewayError) and error.counted:
            return
        code = error.code if isinstance(error, GatewayError) else "INTERNAL"
        if model not in self.repository.models:
            variant = self.repository.variant(model)
            model = variant.model if variant is not None else "unknown"
        metrics.requests(model, "none", protocol, code).inc()

    @staticmethod
    def count_routing(
        model: Model, target: Model | Variant, decision: Decision, variant: Variant
    ) -> None:
        """Count a served request's fallback and routing decision."""
        Gateway._count_routing(model, target, decision, variant)

    @staticmethod
    def _count_routing(
        model: Model, target: Model | Variant, decision: Decision, variant: Variant
    ) -> None:
        if variant.precision != decision.precision:
            metrics.FALLBACKS.labels(
                model=model.name,
                from_precision=decision.precision,
                to_precision=variant.precision,
            ).inc()
        if isinstance(target, Model):
            metrics.routing_decisions(model.name, decision.precision, decision.policy).inc()

    def admit(self, access: Access, headers: Callable[[], Mapping[str, str]]) -> None:
        """The one authorization check of a call, made by its transport before it reads the
        call's body: with a token set (``--auth-token``), calls that always need it
        (inference, system shared memory, model load/unload) and calls in a
        ``--restricted-api`` group must carry ``authorization: Bearer <token>``. ``headers``:
        the call's headers by lower-case name (read only when a token is set)."""
        if not self.auth_token or not (access.always or access.group in self.restricted):
            return
        given = headers().get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.auth_token.encode()
        ):
            raise Unauthenticated("missing or wrong bearer token (header 'authorization')")

    def _deadline(self, request: InferRequest) -> float | None:
        deadline = request.deadline
        timeout_s = timeout_seconds(request.parameters.get(TIMEOUT_PARAMETER))
        if timeout_s is not None:
            own = time.monotonic() + timeout_s
            deadline = own if deadline is None else min(deadline, own)
        _refuse_past(deadline)
        return deadline

    def decide(self, model: Model, request: InferRequest) -> Decision:
        """The precision for a request to logical ``model``: the ``precision`` parameter, the
        ``x-precision`` header, else the model's policy."""
        return self._decide(model, request)

    def _decide(self, model: Model, request: InferRequest) -> Decision:
        requested = request.parameters.get(PRECISION_PARAMETER)
        source = "request"
        if not requested:
            requested = request.headers.get(PRECISION_HEADER)
            source = "header"
        if requested is not None and not isinstance(requested, str):
            raise InvalidInput(f"parameter 'precision' must be a string, got {requested!r}")
        key = request.parameters.get(REQUEST_KEY) or request.headers.get(REQUEST_KEY)
        return self.router.decide(model.name, requested or None, source, str(key) if key else None)

    def _check_size(self, request: InferRequest) -> None:
        total = sum(t.nbytes for t in request.inputs)
        if total > self.max_request_bytes:
            raise PayloadTooLarge(
                f"request inputs are {total} bytes, over the limit of {self.max_request_bytes}"
            )

    def _validate(self, variant: Variant, request: InferRequest) -> dict[str, np.ndarray]:
        # Triton's words for each error (server/dataplane/wording.py), naming the model as the
        # request did
        rid, model = request.id, request.model
        given: dict[str, WireTensor] = {}
        for t in request.inputs:
            if t.name in given:
                raise InvalidInput(wording.duplicate_input(rid, t.name))
            given[t.name] = t
        expected = {t.name for t in variant.inputs}
        unknown = [n for n in given if n not in expected]
        if unknown:
            raise InvalidInput(_input_error(variant, request, unknown[0]))
        batched = variant.max_batch_size > 0
        arrays: dict[str, np.ndarray] = {}
        batch: int | None = None
        for spec in variant.inputs:
            t = given.get(spec.name)
            if t is None:
                raise InvalidInput(_input_error(variant, request, None))
            if t.datatype != spec.datatype:
                raise InvalidInput(
                    wording.datatype(rid, spec.name, t.datatype, model, spec.datatype)
                )
            self.check_shape(variant, spec, list(t.shape), batched, model=model, request_id=rid)
            if batched:
                if batch is not None and t.shape[0] != batch:
                    raise InvalidInput(
                        f"{wording.batch_mismatch(rid, spec.name, model)} ({t.shape[0]} vs {batch})"
                    )
                batch = t.shape[0]
            arrays[spec.name] = decode(t, model, rid)
        if request.outputs is not None:
            names = {o.name for o in variant.outputs}
            bad = [n for n in request.outputs if n not in names]
            if bad:
                raise InvalidInput(
                    wording.unexpected_output(bad[0], model, [o.name for o in variant.outputs])
                )
        return arrays

    @staticmethod
    def check_shape(
        variant: Variant,
        spec: TensorInfo,
        shape: list[int],
        batched: bool,
        *,
        model: str = "",
        request_id: str = "",
    ) -> None:
        """InvalidInput unless ``shape`` fits ``spec`` of ``variant``: rank, dims, the
        manifest's maximum dims, the batch range (the fast lane's check too); Triton's words
        (server/dataplane/wording.py), naming ``model`` (default: the variant)."""
        model = model or variant.name
        want = _dims(spec, batched)
        if batched and not shape:
            raise InvalidInput(wording.no_batch_dim(request_id, spec.name, model))
        rank_ok = len(shape) == len(want)
        dims_ok = rank_ok and all(w == -1 or w == g for w, g in zip(want, shape, strict=True))
        if not dims_ok or any(d < 0 for d in shape):
            raise InvalidInput(wording.shape(request_id, spec.name, model, want, shape))
        if spec.max_shape is not None:  # before any element is decoded
            given = shape[1:] if batched else shape
            for i, (g, most) in enumerate(zip(given, spec.max_shape, strict=True)):
                if g > most:
                    at = i + 1 if batched else i
                    raise InvalidInput(
                        f"input {spec.name!r}: dim {at} is {g}, over the model's maximum {most} "
                        f"(largest shape {_dims_max(spec, batched)}, got {shape})"
                    )
        if batched and shape[0] > variant.max_batch_size:
            raise InvalidInput(wording.batch_too_large(request_id, variant.max_batch_size, model))
        if batched and shape[0] < 1:  # Triton reads a batch of 0 as "no batch": its own words
            raise InvalidInput(
                f"input '{spec.name}': batch size {shape[0]} is outside "
                f"1..{variant.max_batch_size} (max_batch_size of '{model}')"
            )

    async def _first_ready(
        self,
        model: Model,
        candidates: list[str],
        call: Callable[[Variant], Awaitable[_T]],
        deadline: float | None,
    ) -> tuple[Variant, _T]:
        """``call`` on the first candidate that is ready, ended at ``deadline`` here when the
        upstream does not declare that it ends calls there itself."""
        run = self._fallback(model, candidates, call)
        if deadline is None or self.upstream.capabilities.honours_deadline:
            return await run
        try:  # an upstream that may not stop at the deadline: bound it here
            return await asyncio.wait_for(run, deadline - time.monotonic())
        except TimeoutError:
            raise DeadlineExceeded(f"deadline exceeded while {model.name!r} was running") from None

    async def _fallback(
        self,
        model: Model,
        candidates: list[str],
        call: Callable[[Variant], Awaitable[_T]],
    ) -> tuple[Variant, _T]:
        """``call`` on the first candidate variant that is ready and not unavailable upstream
        (the fallback order); the upstream duration observed here unless the upstream declares
        that it records its own timing."""
        timed = not self.upstream.capabilities.records_timing
        reasons = []
        for precision in candidates:
            variant = model.variants[precision]
            if not self.upstream.ready(variant):
                reasons.append(f"{variant.name}: not ready")
                continue
            started = time.monotonic()
            try:
                result = await call(variant)
            except UpstreamUnavailable as e:
                reasons.append(f"{variant.name}: {e.message}")
                continue
            except GatewayError:
                self._record(variant, 0, None, ok=False)
                raise
            if timed:
                metrics.upstream_duration(model.name, variant.precision).observe(
                    time.monotonic() - started
                )
            return variant, result
        # the reasons name replicas and engine errors: the log has them, the client does not
        log.info("no ready variant of %r: %s", model.name, "; ".join(reasons))
        tried = ", ".join(model.variants[p].name for p in candidates)
        raise Unavailable(f"upstream unavailable for model {model.name!r} (tried {tried})")

    @staticmethod
    def _select_outputs(
        variant: Variant, outputs: dict[str, np.ndarray], requested: list[str] | None
    ) -> dict[str, np.ndarray]:
        names = [o.name for o in variant.outputs] if requested is None else requested
        missing = [n for n in names if n not in outputs]
        if missing:
            raise Unavailable(f"upstream returned no output(s) {missing} for {variant.name}")
        return {n: outputs[n] for n in names}

    def _record(self, variant: Variant, rows: int, start: float | None, ok: bool) -> None:
        s = self.stats[variant.name]
        ns = int((time.monotonic() - start) * 1e9) if start is not None else 0
        if ok:
            s.success_count += 1
            s.success_ns += ns
            s.execution_count += 1
            s.inference_count += rows
        else:
            s.fail_count += 1
            s.fail_ns += ns
        s.last_inference_ms = int(time.time() * 1000)

    # ---- shadow traffic -----------------------------------------------------------------------
    # Two ways in, one comparison: the Python front samples in ``infer`` (the served answer is
    # at hand: the reference runs once more); behind the Envoy front, Envoy mirrors the sampled
    # fraction here (``shadow_sample``: Envoy drops a mirror's reply, so the served precision
    # runs again too). At most MAX_SHADOW_TASKS comparisons in flight; each sample left out is
    # counted (precision_serve_shadow_dropped_total) and never touches the served request.
    def is_shadow(self, value: str | None) -> bool:
        """True when ``value`` (the x-ps-shadow header of a call) marks a sample Envoy mirrored
        here: the secret the front put on its mirror cluster (set only with the Envoy front)."""
        token = self.shadow_token
        return bool(token and value) and hmac.compare_digest(str(value).encode(), token.encode())

    async def shadow_sample(
        self, model_name: str | None, parse: Callable[[], Awaitable[InferRequest]]
    ) -> None:
        """A request Envoy mirrored to the control plane (a shadow model's sampled fraction,
        docs/envoy.md) for ``model_name``, ``parse``d by its transport (only when it will be
        compared: a sample beyond the limit costs no decoding): run on the served precision
        and on the reference in the background, their agreement recorded as on the Python path.
        Not a client's request: nothing in the request metrics, no routing decision; returns at
        once and never raises (a sample that cannot run is counted as dropped)."""
        model = self.repository.models.get(model_name or "")
        policy = self.router.policies.get(model.name) if model is not None else None
        if model is None or not isinstance(policy, ShadowPolicy):
            _dropped(model.name if model is not None else "unknown", "invalid")
            return
        if len(self._shadow_tasks) >= MAX_SHADOW_TASKS:
            _dropped(model.name, "busy")
            return
        served, ref = model.variants[policy.precision], model.variants[policy.reference]
        try:
            request = await parse()
            if request.model != model.name:
                raise InvalidInput(f"the sample names {request.model!r}, not {model.name!r}")
            self._check_size(request)
            arrays = self._validate(served, request)
        except Exception as e:  # the client got Triton's answer to the same bytes
            log.debug("shadow sample of %s refused: %s", model.name, e)
            _dropped(model.name, "invalid")
            return
        self._start_shadow(self._compare(served, ref, arrays, None))

    def _mirror(
        self,
        model: Model,
        served: Variant,
        reference: str,
        arrays: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray],
    ) -> None:
        if reference == served.precision:
            return
        if len(self._shadow_tasks) >= MAX_SHADOW_TASKS:
            _dropped(model.name, "busy")
            return
        self._start_shadow(self._compare(served, model.variants[reference], arrays, outputs))

    def _start_shadow(self, comparison: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(comparison)
        self._shadow_tasks.add(task)
        task.add_done_callback(self._shadow_tasks.discard)

    async def _compare(
        self,
        served: Variant,
        ref: Variant,
        arrays: dict[str, np.ndarray],
        outputs: dict[str, np.ndarray] | None,
    ) -> None:
        """``ref`` on ``arrays`` against ``outputs`` (the served answer), or, when None (a
        sample Envoy mirrored), against ``served`` run on them here as well."""
        try:
            if not self.upstream.ready(ref) or not self.upstream.ready(served):
                _dropped(served.model, "unready")
                return
            if outputs is None:
                outputs, ref_out = await asyncio.gather(
                    self.upstream.infer(served, arrays, None),
                    self.upstream.infer(ref, arrays, None),
                )
            else:
                ref_out = await self.upstream.infer(ref, arrays, None)
            name = served.outputs[0].name
            agree, cosines = compare_outputs(
                outputs[name], ref_out[name], served.max_batch_size > 0
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the shadow never affects served traffic
            log.debug("shadow comparison %s vs %s failed: %s", served.name, ref.name, e)
            _dropped(served.model, "failed")
            return
        labels = {"model": served.model, "precision": served.precision, "reference": ref.precision}
        for a in agree:
            metrics.SHADOW_COMPARISONS.labels(**labels, top1_agree=str(a).lower()).inc()
        for c in cosines:
            metrics.SHADOW_COSINE.labels(**labels).observe(c)


def _dropped(model: str, reason: str) -> None:
    metrics.SHADOW_DROPPED.labels(model=model, reason=reason).inc()


def _check_version(name: str, version: str) -> None:
    """Triton's error for a version string other than "" and "1": not a number, negative, or a
    version the model does not have."""
    if not re.fullmatch(r"-?[0-9]+", version):
        raise InvalidVersion(wording.invalid_version(version))
    if version.startswith("-"):
        raise InvalidVersion(wording.negative_version(version))
    if int(version) != 1:  # "01" is version 1, as Triton reads it
        raise ModelNotFound(wording.unknown_version(name, str(int(version))))


def timeout_seconds(timeout_us: Any) -> float | None:
    """The ``timeout`` parameter (microseconds) in seconds; None when absent or 0 (Triton's "no
    timeout"). Only finite positive numbers are deadlines: NaN or inf would corrupt the event
    loop's timer heap, a negative one is a mistake."""
    if timeout_us is None or (timeout_us == 0 and not isinstance(timeout_us, bool)):
        return None
    if isinstance(timeout_us, bool) or not isinstance(timeout_us, int | float):
        raise InvalidInput(
            f"parameter 'timeout' must be a number of microseconds, got {timeout_us!r}"
        )
    if not math.isfinite(timeout_us) or timeout_us < 0:
        raise InvalidInput(
            f"parameter 'timeout' must be finite and positive microseconds, got {timeout_us!r}"
        )
    return float(timeout_us) / 1e6


def compare_outputs(
    served: np.ndarray, reference: np.ndarray, batched: bool
) -> tuple[list[bool], list[float]]:
    """Per row: top-1 (argmax) agreement and cosine similarity of the flattened outputs."""
    a = np.asarray(served, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if not batched:
        a, b = a[None, ...], b[None, ...]
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    agree = [bool(x) for x in np.argmax(a, axis=1) == np.argmax(b, axis=1)]
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
    return agree, [float(c) for c in cos]


def _counted_failure(
    e: BaseException, model: str, precision: str, protocol: str, deadline: float | None
) -> BaseException:
    """Count a failed inference in ``precision_serve_requests_total``; returns what to raise:
    ``e`` itself (a gateway error, a cancellation) or, for anything else (a bug, an upstream's
    unexpected error), an InternalError with an id."""
    if isinstance(e, GatewayError):
        metrics.requests(model, precision, protocol, e.code).inc()
        e.counted = True
        return e
    if isinstance(e, asyncio.CancelledError):  # the client went away or its deadline passed
        expired = deadline is not None and time.monotonic() >= deadline
        status = "DEADLINE_EXCEEDED" if expired else "CANCELLED"
        metrics.requests(model, precision, protocol, status).inc()
        return e
    metrics.requests(model, precision, protocol, "INTERNAL").inc()
    error = InternalError(f"{type(e).__name__}: {e}")
    error.counted = True
    return error


counted_failure = _counted_failure  # for the generation path (server/dataplane/generation.py)


def _fell_back(decision: Decision, variant: Variant) -> str:
    return decision.precision if variant.precision != decision.precision else ""


def _rows(variant: Variant, arrays: dict[str, np.ndarray]) -> int:
    first = next(iter(arrays.values()), None)
    return int(first.shape[0]) if first is not None and variant.max_batch_size > 0 else 1


def _input_error(variant: Variant, request: InferRequest, unknown: str | None) -> str:
    """Triton's error for inputs that do not match the model's: their count when it differs
    (missing or extra inputs), else the first ``unknown`` name."""
    names = [t.name for t in request.inputs]
    expected = [t.name for t in variant.inputs]
    if len(names) != len(expected) or unknown is None:
        return wording.input_count(request.id, request.model, expected, names)
    return wording.unexpected_input(unknown, request.model, expected)


def _dims(spec: TensorInfo, batched: bool) -> list[int]:
    return ([-1] if batched else []) + list(spec.shape)


def _dims_max(spec: TensorInfo, batched: bool) -> list[int]:
    assert spec.max_shape is not None
    return ([-1] if batched else []) + list(spec.max_shape)
