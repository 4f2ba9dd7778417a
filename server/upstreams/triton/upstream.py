"""The Triton upstream: ``--upstream triton://h1:8001,h2:8001`` - one or more Triton replicas.

- One ``tritonclient.grpc.aio`` client per replica (gRPC ports of Triton servers serving the same
  repository: a Triton container on the standard repository, or ``precision-serve triton start``).
- Readiness is checked on an interval: ServerReady (does the replica answer at all) and then
  ModelReady for every variant. A variant is servable on a replica when its ModelReady is true (a
  Triton with ``--strict-readiness`` reports the *server* unready while any model is unloaded;
  its other models still serve). Transitions are logged, and each replica/variant pair is
  exported as ``precision_serve_upstream_ready{upstream="triton://HOST:PORT", model=VARIANT}``.
- Balancing: the ready replica with the fewest outstanding requests (ties rotate).
- A call answered UNAVAILABLE (replica gone: refused, reset) or NOT_FOUND (variant not loaded
  there) marks that replica/variant unready until the next check, and is retried once on another
  ready replica. An UNAVAILABLE that is Triton's own model-level answer is told apart by its
  message (:func:`unavailable_scope`): "exceeds maximum queue size" (that variant's queue is full:
  retried elsewhere, nothing is marked) or the variant not ready there (only that replica/variant
  is marked); the replica stays up for its other variants. When no replica can serve the
  variant, :class:`UpstreamUnavailable` is raised and the core falls back along the model's
  precision chain.
- A replica with nothing listening never stops the gateway: it is just unready.
- Membership can change at run time (:meth:`TritonUpstream.set_replicas`, used by discovery in
  server/upstreams/triton/dns.py): a joining replica is checked before it is picked; a leaving one
  is never picked again and its channels close when its last outstanding call ends.
- Pass-through (:meth:`TritonUpstream.forward`): a gRPC ModelInfer is forwarded as the client's
  own bytes with the variant's name appended as a second ``model_name`` field (protobuf keeps
  the last value of a scalar field), on a raw grpc.aio channel per replica; Triton's reply bytes
  come back as they are. Statuses other than the replica/variant failures above are Triton's
  own, code and message unchanged (:class:`UpstreamStatus`). Each request is its own Triton
  call: Triton's dynamic batcher batches.
- Model control (``--model-control explicit``): :meth:`TritonUpstream.load` / ``unload`` call
  Triton's own load/unload on every replica (started with ``--model-control-mode=explicit``,
  serving the same repository) and re-check their readiness at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcaio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from common.model_repository import to_datatype
from server.catalog import Repository, Variant
from server.errors import ConfigError, DeadlineExceeded, GatewayError, InternalError, InvalidInput
from server.upstreams.base import (
    Capabilities,
    UpstreamBase,
    UpstreamSettings,
    UpstreamUnavailable,
    forget_ready,
    report_ready,
)
from server.upstreams.generation import GenerationRequest
from server.upstreams.triton.detach import detached

_T = TypeVar("_T")
log = logging.getLogger(__name__)

CHECK_INTERVAL_S = 1.0  # readiness poll period per replica
CHECK_TIMEOUT_S = 2.0  # per health RPC
_MAX_MESSAGE = 2**31 - 1
# tritonclient's defaults (message sizes) plus a short reconnect backoff, so that a replica that
# comes back is seen within a few seconds instead of gRPC's default of up to two minutes.
_CHANNEL_ARGS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]
# Status codes after which another replica may succeed.
_REPLICA_DOWN = "UNAVAILABLE"
_NOT_LOADED = "NOT_FOUND"
# UNAVAILABLE messages that are Triton's answer about one model, not a failed connection.
# (libtritonserver's texts: "Exceeds maximum queue size", "... has no available versions",
# "Model version not ready"; "Server not ready" is about the whole replica.)
_QUEUE_FULL = ("exceeds maximum queue size",)
_REPLICA_NOT_READY = ("server not ready",)
_MODEL_UNAVAILABLE = ("no available versions", "not ready", "not loaded")
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


class UpstreamStatus(GatewayError):
    """Triton's own answer to a forwarded call: its status code name and message, unchanged."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@functools.cache
def model_name_field(name: str) -> bytes:
    """``ModelInferRequest.model_name`` serialised on its own (once per variant): appended to a
    serialised request it replaces the client's model name (the last value of a field wins)."""
    return pb.ModelInferRequest(model_name=name).SerializeToString()


def parse_replicas(address: str) -> list[str]:
    """``"h1:8001,h2:8001"`` -> ["h1:8001", "h2:8001"]; ConfigError naming a bad entry."""
    replicas: list[str] = []
    for raw in address.split(","):
        entry = raw.strip()
        if not entry:
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"triton upstream address {entry!r} is not HOST:PORT")
        if entry in replicas:
            raise ConfigError(f"triton upstream lists replica {entry} twice")
        replicas.append(entry)
    if not replicas:
        raise ConfigError("triton upstream needs at least one HOST:PORT")
    return replicas


def unavailable_scope(message: str) -> str:
    """What an UNAVAILABLE from a replica is about: ``"queue"`` (Triton's "Exceeds maximum queue
    size" for the variant), ``"variant"`` (the variant is not ready there) or ``"replica"``
    (anything else: refused, reset, no answer - the replica is down)."""
    text = message.lower()
    if any(p in text for p in _QUEUE_FULL):
        return "queue"
    if any(p in text for p in _REPLICA_NOT_READY):
        return "replica"
    if any(p in text for p in _MODEL_UNAVAILABLE):
        return "variant"
    return "replica"


def _code(e: InferenceServerException) -> str:
    """``"StatusCode.UNAVAILABLE"`` -> ``"UNAVAILABLE"``."""
    return str(e.status() or "").rpartition(".")[2]


@dataclass
class Replica:
    address: str
    client: grpcaio.InferenceServerClient | None = None
    reachable: bool = False
    server_ready: bool = False
    models: dict[str, bool] = field(default_factory=dict)  # variant name -> ModelReady
    outstanding: int = 0
    problem: str | None = None  # why it is not reachable, when it is not
    leaving: bool = False  # dropped from discovery: closed once ``outstanding`` reaches 0
    channel: grpc.aio.Channel | None = None  # raw channel for forwarded ModelInfer calls
    raw_infer: Any = None  # its ModelInfer callable: bytes in, bytes out

    @property
    def label(self) -> str:
        return f"triton://{self.address}"

    def ready_for(self, variant: str) -> bool:
        return self.reachable and self.models.get(variant, False)


class TritonUpstream(UpstreamBase):
    name = "triton"
    # each call's client_timeout is what is left of its deadline; gRPC ModelInfer passes
    # through as bytes; load/unload go to every replica
    capabilities = Capabilities(
        honours_deadline=True, forward=True, model_control=True, generate=True, statistics=True
    )

    def __init__(self, address: str, repository: Repository, settings: UpstreamSettings) -> None:
        self._repository = repository
        self._settings = settings
        self.replicas = [Replica(a) for a in self._initial_replicas(address)]
        self._rotation = itertools.count()
        self._checker: asyncio.Task | None = None
        self._kick = asyncio.Event()
        self._closing: set[asyncio.Task] = set()  # channels of left replicas being closed
        self.check_interval = CHECK_INTERVAL_S

    def _initial_replicas(self, address: str) -> list[str]:
        return parse_replicas(address)

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        for replica in self.replicas:
            self._open(replica)
        await self.check_all()
        self._checker = asyncio.create_task(self._check_loop(), name="triton-readiness")

    @staticmethod
    def _open(replica: Replica) -> None:
        replica.client = grpcaio.InferenceServerClient(
            replica.address, channel_args=list(_CHANNEL_ARGS)
        )
        replica.channel = grpc.aio.insecure_channel(replica.address, options=_CHANNEL_ARGS)
        replica.raw_infer = replica.channel.unary_unary(
            MODEL_INFER, request_serializer=None, response_deserializer=None
        )

    @staticmethod
    async def _shut(replica: Replica) -> None:
        await TritonUpstream._close_handles(replica.client, replica.channel)
        replica.client, replica.channel, replica.raw_infer = None, None, None

    @staticmethod
    async def _close_handles(
        client: grpcaio.InferenceServerClient | None, channel: grpc.aio.Channel | None
    ) -> None:
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()
        if channel is not None:
            with contextlib.suppress(Exception):
                await channel.close()

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checker
            self._checker = None
        for replica in self.replicas:
            await self._shut(replica)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # ---- membership (discovery: server/upstreams/triton/dns.py)
    # ------------------------------------
    async def set_replicas(self, addresses: list[str]) -> tuple[list[str], list[str]]:
        """Make ``addresses`` the replica set; returns (added, removed) addresses.

        A new replica is opened and checked before it can be picked. A removed one is no
        longer picked; its channels close when its outstanding calls have finished.
        """
        wanted = list(dict.fromkeys(addresses))
        current = {r.address: r for r in self.replicas}
        added = [Replica(a) for a in wanted if a not in current]
        removed = [r for a, r in current.items() if a not in wanted]
        for replica in added:
            self._open(replica)
        # checked before joining, so that a new replica takes traffic only once it is ready
        await asyncio.gather(*(self._check(r) for r in added))
        keep = [r for r in self.replicas if r.address in wanted]
        self.replicas = keep + added
        for replica in removed:
            replica.leaving = True
            for variant in self._repository.variants():
                forget_ready(replica.label, variant)
            log.info(
                "triton replica %s left (%d call(s) in flight)",
                replica.address,
                replica.outstanding,
            )
            self._release(replica, started=False)
        for replica in added:
            log.info("triton replica %s joined", replica.address)
        return [r.address for r in added], [r.address for r in removed]

    def _release(self, replica: Replica, started: bool = True) -> None:
        """One call on ``replica`` ended; a leaving replica's channels close at the last one."""
        if started:
            replica.outstanding -= 1
        if replica.leaving and replica.outstanding == 0 and replica.channel is not None:
            handles = (replica.client, replica.channel)
            replica.client, replica.channel, replica.raw_infer = None, None, None
            task = asyncio.ensure_future(self._close_handles(*handles))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # ---- readiness --------------------------------------------------------------------------
    async def _check_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self.check_interval)
            self._kick.clear()
            try:
                await self.check_all()
            except Exception:  # never let the checker die
                log.exception("triton readiness check failed")

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(r) for r in list(self.replicas)))

    async def _check(self, replica: Replica) -> None:
        if replica.client is None or replica.leaving:
            return
        variants = self._repository.variants()
        try:
            server_ready = await replica.client.is_server_ready(client_timeout=CHECK_TIMEOUT_S)
            states = await asyncio.gather(
                *(
                    replica.client.is_model_ready(v.name, client_timeout=CHECK_TIMEOUT_S)
                    for v in variants
                ),
                return_exceptions=True,
            )
        except InferenceServerException as e:
            self._set_unreachable(replica, f"{_code(e)}: {e.message()}")
            return
        if not replica.reachable:
            log.info(
                "triton replica %s is reachable (server ready: %s)", replica.address, server_ready
            )
        replica.reachable, replica.server_ready, replica.problem = True, bool(server_ready), None
        for variant, state in zip(variants, states, strict=True):
            self._set_model(replica, variant, state is True)

    def _set_unreachable(self, replica: Replica, reason: str) -> None:
        if replica.reachable or replica.problem is None:
            log.warning("triton replica %s is unready: %s", replica.address, reason)
        replica.reachable, replica.server_ready, replica.problem = False, False, reason
        for variant in self._repository.variants():
            self._set_model(replica, variant, False)

    def _set_model(self, replica: Replica, variant: Variant, ready: bool) -> None:
        before = replica.models.get(variant.name)
        replica.models[variant.name] = ready
        if replica.leaving:
            return
        if before is not None and before != ready and replica.reachable:
            log.info(
                "triton replica %s: variant %s is %s",
                replica.address,
                variant.name,
                "ready" if ready else "unready",
            )
        report_ready(replica.label, variant, ready)

    def ready(self, variant: Variant) -> bool:
        return any(r.ready_for(variant.name) for r in self.replicas)

    # ---- inference --------------------------------------------------------------------------
    def _pick(self, variant: Variant, exclude: Replica | None = None) -> Replica | None:
        candidates = [r for r in self.replicas if r is not exclude and r.ready_for(variant.name)]
        if not candidates:
            return None
        start = next(self._rotation) % len(candidates)
        rotated = candidates[start:] + candidates[:start]
        return min(rotated, key=lambda r: r.outstanding)

    async def infer(
        self, variant: Variant, inputs: dict[str, np.ndarray], deadline: float | None
    ) -> dict[str, np.ndarray]:
        return await self._with_retry(
            variant, lambda replica: self._call(replica, variant, inputs, deadline)
        )

    async def forward(self, variant: Variant, payload: bytes, deadline: float | None) -> bytes:
        """A serialised ModelInferRequest for ``variant`` -> Triton's serialised reply."""
        request = payload + model_name_field(variant.name)
        return await self._with_retry(
            variant, lambda replica: self._forward(replica, variant, request, deadline)
        )

    async def _with_retry(
        self, variant: Variant, attempt: Callable[[Replica], Awaitable[_T]]
    ) -> _T:
        """``attempt`` on the least-loaded ready replica; once more on another when it fails."""
        replica = self._pick(variant)
        if replica is None:
            raise UpstreamUnavailable(self._unready_reason(variant))
        try:
            return await attempt(replica)
        except _ReplicaFailed as first:
            retry = self._pick(variant, exclude=replica)
            if retry is None:
                raise UpstreamUnavailable(
                    f"variant {variant.name}: replica {replica.address} failed ({first}) "
                    "and no other replica is ready"
                ) from None
            log.info("retrying %s on %s after %s", variant.name, retry.address, first)
            try:
                return await attempt(retry)
            except _ReplicaFailed as second:
                raise UpstreamUnavailable(
                    f"variant {variant.name}: replicas {replica.address} ({first}) and "
                    f"{retry.address} ({second}) failed"
                ) from None

    def _timeout(self, variant: Variant, deadline: float | None) -> float:
        """Seconds a call may take: what is left of ``deadline`` (DeadlineExceeded when
        nothing is), else the default per-call timeout."""
        if deadline is None:
            return self._settings.default_timeout_s
        timeout = deadline - time.monotonic()
        if timeout <= 0:
            raise DeadlineExceeded(f"deadline passed before {variant.name} was called")
        return timeout

    async def _forward(
        self, replica: Replica, variant: Variant, request: bytes, deadline: float | None
    ) -> bytes:
        timeout = self._timeout(variant, deadline)
        replica.outstanding += 1
        try:
            if self._settings.cancel_upstream:
                return await replica.raw_infer(request, timeout=timeout)
            return await detached(
                lambda t: replica.raw_infer(request, timeout=t),
                timeout,
                self._settings.default_timeout_s,
                variant.name,
            )
        except grpc.aio.AioRpcError as e:
            code, message = e.code().name, e.details() or ""
            self._mark_failed(replica, variant, code, message)
            raise UpstreamStatus(code, message) from None
        finally:
            self._release(replica)

    def _unready_reason(self, variant: Variant) -> str:
        parts = [
            f"{r.address}: {r.problem or 'variant not ready'}"
            for r in self.replicas
            if not r.ready_for(variant.name)
        ]
        return f"variant {variant.name} is not ready on any Triton replica ({'; '.join(parts)})"

    async def _call(
        self,
        replica: Replica,
        variant: Variant,
        inputs: dict[str, np.ndarray],
        deadline: float | None,
    ) -> dict[str, np.ndarray]:
        assert replica.client is not None
        timeout = self._timeout(variant, deadline)
        request = []
        for name, array in inputs.items():
            tensor = InferInput(name, list(array.shape), to_datatype(array.dtype))
            tensor.set_data_from_numpy(array)
            request.append(tensor)
        outputs = [InferRequestedOutput(t.name) for t in variant.outputs]
        replica.outstanding += 1
        client = replica.client
        try:
            if self._settings.cancel_upstream:
                result = await client.infer(
                    variant.name, request, outputs=outputs, client_timeout=timeout
                )
            else:
                result = await detached(
                    lambda t: client.infer(
                        variant.name, request, outputs=outputs, client_timeout=t
                    ),
                    timeout,
                    self._settings.default_timeout_s,
                    variant.name,
                )
        except InferenceServerException as e:
            self._raise_for(replica, variant, e)
        finally:
            self._release(replica)
        return {t.name: result.as_numpy(t.name) for t in variant.outputs}

    def _mark_failed(self, replica: Replica, variant: Variant, code: str, message: str) -> None:
        """Raise _ReplicaFailed (another replica may serve) after marking what failed: the whole
        replica, only this variant there, or nothing (its queue was full); else return."""
        if code == _REPLICA_DOWN:
            scope = unavailable_scope(message)
            if scope == "replica":
                self._set_unreachable(replica, f"{code}: {message}")
                self._kick.set()
            elif scope == "variant":
                self._set_model(replica, variant, False)
                self._kick.set()
            raise _ReplicaFailed(f"{code}: {message}")
        if code == _NOT_LOADED:
            self._set_model(replica, variant, False)
            self._kick.set()
            raise _ReplicaFailed(f"{code}: {message}")

    def _raise_for(self, replica: Replica, variant: Variant, e: InferenceServerException) -> None:
        code, message = _code(e), e.message() or ""
        self._mark_failed(replica, variant, code, message)
        if code == "DEADLINE_EXCEEDED":
            raise DeadlineExceeded(f"{variant.name} on {replica.address}: deadline exceeded")
        if code == "INVALID_ARGUMENT":
            raise InvalidInput(f"{variant.name}: {message}")
        raise InternalError(f"{variant.name} on Triton {replica.address}: {code}: {message}")

    # ---- LLM generation (server/upstreams/triton/generation.py) -------------------------------
    async def generate(self, variant: Variant, request: GenerationRequest) -> Any:
        """A ModelStreamInfer stream on a ready replica; a replica that is down or does not
        have the variant is marked and one other is tried, as for inference."""
        from server.upstreams.triton.generation import open_generation

        failed: Replica | None = None
        for _ in range(2):
            replica = self._pick(variant, exclude=failed)
            if replica is None or replica.channel is None:
                break
            try:
                return await open_generation(
                    replica.channel, variant, request, self._settings.cancel_upstream
                )
            except grpc.aio.AioRpcError as e:
                code, message = e.code().name, e.details() or ""
                try:
                    self._mark_failed(replica, variant, code, message)
                except _ReplicaFailed:
                    failed = replica
                    continue
                raise InternalError(
                    f"{variant.name} on Triton {replica.address}: {code}: {message}"
                ) from None
        raise UpstreamUnavailable(self._unready_reason(variant))

    # ---- model control (server/dataplane/model_control.py)
    # ----------------------------------------------
    async def load(self, variant: Variant) -> None:
        await self._on_every_replica("load_model", variant)

    async def unload(self, variant: Variant) -> None:
        await self._on_every_replica("unload_model", variant)

    async def _ask_reachable(
        self, ask: Callable[[grpcaio.InferenceServerClient], Awaitable[_T]], what: str
    ) -> dict[str, _T]:
        """``ask(client)`` of every reachable replica at once, by address in replica order; a
        replica that does not answer within the default timeout is left out (logged, naming
        ``what``)."""
        replicas = [r for r in self.replicas if r.client is not None and r.reachable]
        answers: dict[str, _T] = {}

        async def one(replica: Replica, client: grpcaio.InferenceServerClient) -> None:
            try:
                answers[replica.address] = await ask(client)
            except InferenceServerException as e:
                log.warning("%s of a replica left out: %s", what, e)

        await asyncio.gather(*(one(r, r.client) for r in replicas if r.client is not None))
        return {r.address: answers[r.address] for r in replicas if r.address in answers}

    async def replica_statistics(self) -> list[pb.ModelStatistics]:
        """Every model's ModelStatistics entry from every reachable replica (unsummed). For a
        front that sends inference to the replicas itself (the Envoy front): only Triton has
        seen it."""
        timeout = self._settings.default_timeout_s
        parts = await self._ask_reachable(
            lambda c: c.get_inference_statistics("", client_timeout=timeout), "statistics"
        )
        return [entry for reply in parts.values() for entry in reply.model_stats]

    async def server_versions(self) -> dict[str, str]:
        """Each reachable replica's tritonserver version (ServerMetadata), by address."""
        timeout = self._settings.default_timeout_s
        found = await self._ask_reachable(
            lambda c: c.get_server_metadata(client_timeout=timeout), "server metadata"
        )
        return {address: str(reply.version) for address, reply in found.items()}

    async def _on_every_replica(self, method: str, variant: Variant) -> None:
        """Triton's load/unload on every replica, then a readiness check of each; an error
        names the replicas that refused (the others have done it)."""
        replicas = [r for r in self.replicas if r.client is not None and not r.leaving]
        results = await asyncio.gather(
            *(
                getattr(r.client, method)(
                    variant.name, client_timeout=self._settings.default_timeout_s
                )
                for r in replicas
            ),
            return_exceptions=True,
        )
        await asyncio.gather(*(self._check(r) for r in replicas))
        failed = [
            f"{r.address}: {_code(e)}: {e.message()}"
            if isinstance(e, InferenceServerException)
            else f"{r.address}: {e}"
            for r, e in zip(replicas, results, strict=True)
            if isinstance(e, BaseException)
        ]
        if failed or not replicas:
            raise UpstreamStatus(
                "UNAVAILABLE" if not replicas else "INTERNAL",
                f"{method} {variant.name} failed on Triton replica(s): "
                + ("; ".join(failed) or "none is connected"),
            )


class _ReplicaFailed(Exception):
    """One replica could not serve the call; another may."""


__all__ = [
    "Replica",
    "TritonUpstream",
    "UpstreamStatus",
    "model_name_field",
    "parse_replicas",
    "unavailable_scope",
]
