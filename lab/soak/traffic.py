"""The soak's valid traffic over gRPC: closed-loop capacity, then an open-loop paced load with
cancellations, and a hook that puts attack requests into the same schedule.

Requests go out as pre-serialised ``ModelInferRequest`` bytes on a plain ``grpc`` channel
(``unary_unary(..., request_serializer=None)``) with the response parsed by tritonclient's
``ModelInferResponse``: the client does as little as possible per request, so that on a small
host most of the CPU is left to the gateway.
"""

from __future__ import annotations

import heapq
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from tritonclient.grpc import service_pb2

from lab.soak.report import Call

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX_MESSAGE = 256 * 1024 * 1024


def channel(url: str) -> grpc.Channel:
    return grpc.insecure_channel(
        url,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
        ],
    )


def model_infer(ch: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """ModelInfer taking serialised request bytes, returning a parsed ModelInferResponse."""
    return ch.unary_unary(
        MODEL_INFER,
        request_serializer=None,
        response_deserializer=service_pb2.ModelInferResponse.FromString,
    )


@dataclass(frozen=True)
class ValidRequest:
    precision: str
    message: bytes  # serialised ModelInferRequest
    output_bytes: int  # expected size of the one raw output


def check_response(req: ValidRequest, resp: service_pb2.ModelInferResponse) -> str | None:
    """None when the answer is right: served at the asked precision, one output of the size the
    manifest implies; else what is wrong."""
    served = resp.parameters["precision"].string_param
    if served != req.precision:
        return f"WRONG_PRECISION: asked {req.precision}, served {served!r}"
    sizes = [len(raw) for raw in resp.raw_output_contents]
    if sizes != [req.output_bytes]:
        return f"WRONG_OUTPUT: raw outputs of {sizes} bytes, expected [{req.output_bytes}]"
    return None


def call_once(call: grpc.UnaryUnaryMultiCallable, req: ValidRequest, timeout: float) -> str | None:
    """One blocking request: None when answered correctly, else the error."""
    try:
        return check_response(req, call(req.message, timeout=timeout))
    except grpc.RpcError as e:
        return f"{e.code().name}: {e.details()}"


@dataclass
class Capacity:
    requests_per_s: float
    ok: int
    errors: int
    seconds: float
    concurrency: int


def measure_capacity(
    url: str, requests: list[ValidRequest], seconds: float, concurrency: int, warmup_s: float = 2.0
) -> Capacity:
    """Closed loop: ``concurrency`` threads send back to back (precisions in turn) for
    ``warmup_s`` (not counted) then ``seconds``; successes per second."""
    ch = channel(url)
    call = model_infer(ch)
    counts = {"ok": 0, "errors": 0}
    lock = threading.Lock()
    begin = time.monotonic() + warmup_s
    end = begin + seconds

    def run(k: int) -> None:
        i = k
        while (now := time.monotonic()) < end:
            error = call_once(call, requests[i % len(requests)], timeout=30)
            i += 1
            if now >= begin:
                with lock:
                    counts["ok" if error is None else "errors"] += 1

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + warmup_s + 60)
    ch.close()
    return Capacity(
        round(counts["ok"] / seconds, 1), counts["ok"], counts["errors"], seconds, concurrency
    )


@dataclass
class Cancellations:
    sent: int = 0
    cancelled: int = 0  # CANCELLED: the client's cancel() took effect
    deadline: int = 0  # DEADLINE_EXCEEDED
    completed: int = 0  # answered before the cancel / deadline
    other: dict[str, int] = field(default_factory=dict)


@dataclass
class PacedResult:
    calls: list[Call]
    skipped: int
    cancellations: Cancellations
    attacks_scheduled: int
    duration_s: float
    rate: float


class PacedLoad:
    """Open loop: request ``i`` leaves at ``t0 + i / rate`` whatever happened to the earlier
    ones (asynchronous ``future`` calls); a fraction of the slots are cancellations (a 0.5-3 ms
    deadline, or ``cancel()`` 0-3 ms after sending) and a fraction go to ``attack(i)``."""

    def __init__(
        self,
        url: str,
        requests: list[ValidRequest],
        rate: float,
        *,
        attack: Callable[[int], None] | None = None,
        attack_fraction: float = 0.05,
        cancel_fraction: float = 0.02,
        deadline_s: float = 30.0,
        max_in_flight: int = 2000,
        seed: int = 0,
    ) -> None:
        self.requests, self.rate = requests, rate
        self.attack, self.attack_fraction = attack, attack_fraction
        self.cancel_fraction, self.deadline_s = cancel_fraction, deadline_s
        self.max_in_flight = max_in_flight
        self._rng = random.Random(seed)
        self._channel = channel(url)
        self._call = model_infer(self._channel)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._pending_cancels: list[tuple[float, int, grpc.Future]] = []
        self.calls: list[Call] = []
        self.cancellations = Cancellations()
        self.skipped = 0
        self.attacks = 0
        self.t0 = time.monotonic()

    def run(self, duration_s: float, t0: float | None = None) -> PacedResult:
        self.t0 = time.monotonic() if t0 is None else t0
        i = 0
        while (due := i / self.rate) < duration_s:
            delay = self.t0 + due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._cancel_due()
            self._slot(i)
            i += 1
        self._drain()
        return PacedResult(
            list(self.calls), self.skipped, self.cancellations, self.attacks, duration_s, self.rate
        )

    def _slot(self, i: int) -> None:
        r = self._rng.random()
        if r < self.attack_fraction and self.attack is not None:
            self.attacks += 1
            self.attack(i)
        elif r < self.attack_fraction + self.cancel_fraction:
            self._send_cancelled(self.requests[i % len(self.requests)])
        else:
            self._send(self.requests[i % len(self.requests)])

    def _reserve(self) -> bool:
        with self._lock:
            if self._in_flight >= self.max_in_flight:
                self.skipped += 1
                return False
            self._in_flight += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def _send(self, req: ValidRequest) -> None:
        if not self._reserve():
            return
        start = time.monotonic()
        future = self._call.future(req.message, timeout=self.deadline_s)
        future.add_done_callback(lambda f: self._done(f, req, start))

    def _done(self, future: grpc.Future, req: ValidRequest, start: float) -> None:
        end = time.monotonic()
        try:
            error = check_response(req, future.result())
        except grpc.RpcError as e:
            error = f"{e.code().name}: {e.details()}"
        except grpc.FutureCancelledError:
            error = "CANCELLED: by the client"
        with self._lock:
            self.calls.append(Call(start - self.t0, end - self.t0, req.precision, error))
        self._release()

    def _send_cancelled(self, req: ValidRequest) -> None:
        if not self._reserve():
            return
        self.cancellations.sent += 1
        delay = self._rng.uniform(0.0005, 0.003)
        if self._rng.random() < 0.5:
            future = self._call.future(req.message, timeout=delay)
        else:
            future = self._call.future(req.message, timeout=self.deadline_s)
            heapq.heappush(self._pending_cancels, (time.monotonic() + delay, id(future), future))
        future.add_done_callback(self._cancel_done)

    def _cancel_done(self, future: grpc.Future) -> None:
        c = self.cancellations
        with self._lock:
            if future.cancelled():
                c.cancelled += 1
            else:
                code = future.code()
                if code == grpc.StatusCode.OK:
                    c.completed += 1
                elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    c.deadline += 1
                elif code == grpc.StatusCode.CANCELLED:
                    c.cancelled += 1
                else:
                    c.other[code.name] = c.other.get(code.name, 0) + 1
        self._release()

    def _cancel_due(self, everything: bool = False) -> None:
        now = time.monotonic()
        while self._pending_cancels and (everything or self._pending_cancels[0][0] <= now):
            heapq.heappop(self._pending_cancels)[2].cancel()

    def _drain(self) -> None:
        self._cancel_due(everything=True)
        with self._idle:
            self._idle.wait_for(lambda: self._in_flight == 0, timeout=self.deadline_s + 10)
        self._channel.close()
