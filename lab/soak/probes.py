"""The "Must show" measurements that need a quiet gateway: health and valid-infer latency while
one 60 MB request is in flight, and resident memory after many rejected 60 MB requests."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lab.soak import procstat
from lab.soak.attacks import Attacks, Outcome
from lab.soak.payloads import GrpcRequest, HttpRequest
from lab.soak.report import MB, percentiles_ms
from lab.soak.traffic import ValidRequest, call_once, channel, model_infer

MIN_PROBES = 3
PROBE_TIMEOUT_S = 60.0


Probe = tuple[float, bool]  # (milliseconds, answered correctly)


def _health_ms(conn: http.client.HTTPConnection) -> Probe:
    """One ``GET /v2/health/ready`` on a kept-alive connection; ok when 200."""
    start = time.monotonic()
    try:
        conn.request("GET", "/v2/health/ready")
        response = conn.getresponse()
        response.read()
        ok = response.status == 200
    except (OSError, http.client.HTTPException):
        conn.close()
        ok = False
    return (time.monotonic() - start) * 1000.0, ok


def _summary(probe: str, big: Outcome, kind: str, probes: list[Probe]) -> dict[str, Any]:
    """A failed probe counts with the time it took (at most the deadline) and as an error."""
    ms = [m for m, _ in probes]
    p50, _ = percentiles_ms([m / 1000.0 for m in ms])
    return {
        "probe": probe,
        "big": kind,
        "count": len(probes),
        "errors": sum(not ok for _, ok in probes),
        "max_ms": round(max(ms), 2) if ms else None,
        "p50_ms": p50,
        "big_seconds": round(big.seconds, 2),
        "big_status": big.status,
    }


def _probe_until(done: threading.Event, probe: Callable[[], Probe]) -> list[Probe]:
    """``probe()`` every 20 ms until ``done`` is set, at least MIN_PROBES times."""
    out: list[Probe] = []
    while not done.is_set() or len(out) < MIN_PROBES:
        out.append(probe())
        time.sleep(0.02)
    return out


def in_flight(
    attacks: Attacks,
    big: HttpRequest | GrpcRequest,
    grpc_url: str,
    http_url: str,
    valid: ValidRequest,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Send ``big`` (deadline ``timeout_s``); meanwhile two other clients, each on its own
    connection and thread, probe ``/v2/health/ready`` and send a valid ModelInfer every 20 ms
    until it is answered (at least MIN_PROBES each). Latencies in ms."""
    host, port = http_url.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    ch = channel(grpc_url)
    call = model_infer(ch)

    def infer_ms() -> Probe:
        start = time.monotonic()
        error = call_once(call, valid, timeout=timeout_s)
        return (time.monotonic() - start) * 1000.0, error is None

    infer_ms()  # both connected before the big request leaves
    _health_ms(conn)
    done = threading.Event()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="probe") as pool:
        health = pool.submit(_probe_until, done, lambda: _health_ms(conn))
        infer = pool.submit(_probe_until, done, infer_ms)
        try:
            outcome = attacks.send(big, timeout=timeout_s)
        finally:
            done.set()
        rows = [
            _summary("/v2/health/ready", outcome, big.kind, health.result()),
            _summary("valid ModelInfer", outcome, big.kind, infer.result()),
        ]
    conn.close()
    ch.close()
    return rows


def rejected_big(
    attacks: Attacks,
    pid: int,
    requests: list[HttpRequest | GrpcRequest],
    count: int,
    budget_s: float,
) -> dict[str, Any]:
    """Send ``count`` 60 MB requests one after the other (kinds in turn) within ``budget_s``;
    RSS before (baseline), at its highest after any of them, and 2 s after the last."""
    time.sleep(1.0)
    baseline = procstat.rss_bytes(pid)
    peak = baseline
    statuses: dict[str, int] = {}
    unexpected = 0
    started = time.monotonic()
    answered = 0
    for i in range(count):
        if time.monotonic() - started > budget_s:
            break
        outcome = attacks.send(requests[i % len(requests)])
        answered += 1
        key = f"{outcome.kind}: {outcome.status}"
        statuses[key] = statuses.get(key, 0) + 1
        unexpected += not outcome.expected
        peak = max(peak, procstat.rss_bytes(pid))
    seconds = time.monotonic() - started
    time.sleep(2.0)
    after = procstat.rss_bytes(pid)
    return {
        "asked": count,
        "answered": answered,
        "seconds": round(seconds, 1),
        "budget_s": budget_s,
        "baseline_mb": round(baseline / MB, 1),
        "peak_mb": round(peak / MB, 1),
        "after_mb": round(after / MB, 1),
        "rss_delta_mb": round((after - baseline) / MB, 1),
        "statuses": statuses,
        "unexpected_statuses": unexpected,
    }
