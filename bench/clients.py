"""Light load generators: a grpc.aio client sending one pre-serialised ModelInfer request, and
threads calling an engine session in-process.

The gRPC client serialises the request once (Triton's generated ``service_pb2`` message) and
sends the bytes as they are, without decoding responses during a window, so the client's own
cost per request is as small as Python allows; both load generators run ``concurrency``
closed-loop workers for a fixed time after a warm-up and report completed requests per second
and latency percentiles. Everything runs in this process: on a 2-core host the client shares the
cores with the server, which the CPU-time figures make visible.
"""

from __future__ import annotations

import asyncio
import resource
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.grpc import service_pb2

from bench.stats import ms, percentile
from common.model_repository import from_datatype, to_datatype

METHOD = "/inference.GRPCInferenceService/ModelInfer"
MAX_MESSAGE = 64 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
]


def infer_request_bytes(model_name: str, feeds: Mapping[str, np.ndarray]) -> bytes:
    """A serialised ``ModelInferRequest`` carrying ``feeds`` as raw tensors."""
    req = service_pb2.ModelInferRequest(model_name=model_name)
    for name, arr in feeds.items():
        arr = np.ascontiguousarray(arr)
        t = req.inputs.add()
        t.name = name
        t.datatype = to_datatype(arr.dtype)
        t.shape.extend(arr.shape)
        req.raw_input_contents.append(arr.tobytes())
    return req.SerializeToString()


def decode_response(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Outputs and string parameters of a serialised ``ModelInferResponse``."""
    resp = service_pb2.ModelInferResponse.FromString(data)
    outputs = {}
    for spec, raw in zip(resp.outputs, resp.raw_output_contents, strict=False):
        arr = np.frombuffer(raw, dtype=from_datatype(spec.datatype))  # DtypeError if unknown
        outputs[spec.name] = arr.reshape(tuple(spec.shape))
    params = {k: p.string_param for k, p in resp.parameters.items()}
    return outputs, params


@dataclass
class WindowResult:
    concurrency: int
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    client_cpu_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        n = len(self.latencies)
        out: dict[str, Any] = {
            "concurrency": self.concurrency,
            "requests": n,
            "seconds": round(self.seconds, 3),
            "rps": round(n / self.seconds, 2) if self.seconds > 0 else 0.0,
            "mean_ms": ms(sum(self.latencies) / n) if n else None,
            "p50_ms": ms(percentile(self.latencies, 50)),
            "p99_ms": ms(percentile(self.latencies, 99)),
            "errors": self.errors,
            "client_cpu_ms_per_request": round(1000 * self.client_cpu_s / n, 4) if n else None,
        }
        if self.first_error:
            out["first_error"] = self.first_error
        return out


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _grpc_window(
    target: str, payload: bytes, concurrency: int, seconds: float, warmup: float, timeout: float
) -> WindowResult:
    import grpc

    result = WindowResult(concurrency, 0.0)
    async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        measuring = False
        end = time.perf_counter() + warmup

        async def worker() -> None:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                try:
                    await call(payload, timeout=timeout)
                except grpc.aio.AioRpcError as e:
                    if measuring:
                        result.errors += 1
                        result.first_error = result.first_error or f"{e.code().name}: {e.details()}"
                    await asyncio.sleep(0.01)
                    continue
                if measuring:
                    result.latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))  # warm-up
        measuring = True
        cpu0, t0 = _cpu_seconds(), time.perf_counter()
        end = t0 + seconds
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.seconds = time.perf_counter() - t0
        result.client_cpu_s = _cpu_seconds() - cpu0
    return result


def grpc_window(
    target: str,
    payload: bytes,
    concurrency: int,
    seconds: float,
    warmup: float = 0.5,
    timeout: float = 60.0,
) -> dict[str, Any]:
    """``concurrency`` closed-loop gRPC callers for ``seconds`` after ``warmup`` seconds."""
    result = asyncio.run(_grpc_window(target, payload, concurrency, seconds, warmup, timeout))
    return result.summary()


def grpc_call(target: str, payload: bytes, timeout: float = 60.0) -> bytes:
    """One call (for checking what a path returns)."""
    import grpc

    with grpc.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
        return call(payload, timeout=timeout)


def inprocess_window(
    session: Any,
    feeds: Mapping[str, np.ndarray],
    concurrency: int,
    seconds: float,
    warmup: float = 0.5,
) -> dict[str, Any]:
    """``concurrency`` threads calling ``session.run(feeds)`` for ``seconds`` after a warm-up."""
    result = WindowResult(concurrency, 0.0)
    lock = threading.Lock()
    state = {"end": time.perf_counter() + warmup, "measuring": False}

    def worker() -> None:
        local: list[float] = []
        while time.perf_counter() < state["end"]:
            t0 = time.perf_counter()
            session.run(feeds)
            if state["measuring"]:
                local.append(time.perf_counter() - t0)
        with lock:
            result.latencies.extend(local)

    def phase() -> None:
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    phase()
    state["measuring"] = True
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    state["end"] = t0 + seconds
    phase()
    result.seconds = time.perf_counter() - t0
    result.client_cpu_s = _cpu_seconds() - cpu0  # here: the engine's own CPU time
    return result.summary()
