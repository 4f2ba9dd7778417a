"""The soak's hostile clients: small malformed requests (gRPC and HTTP), 60 MB requests now
and then, slow HTTP clients trickling or stalling partial bodies, each on its own threads so
that none of them holds up the paced valid load."""

from __future__ import annotations

import contextlib
import http.client
import itertools
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from lab.soak.payloads import GrpcRequest, HttpRequest
from lab.soak.traffic import channel, model_infer

ATTACK_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    kind: str
    t: float  # start, seconds since the phase began
    seconds: float
    status: str  # HTTP status, gRPC code name, or "reset" / "timeout"
    expected: bool  # a client-error answer as the protocol wants it


def _split(host_port: str) -> tuple[str, int]:
    host, port = host_port.rsplit(":", 1)
    return host, int(port)


def send_http(host_port: str, req: HttpRequest, timeout: float = ATTACK_TIMEOUT_S) -> str:
    """POST ``req`` on a new connection; the status as text, or "reset" when the server closed
    the connection before answering."""
    host, port = _split(host_port)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Content-Type": "application/json", "Connection": "close"}
    try:
        # the server may answer (413) and close before reading the whole body
        with contextlib.suppress(OSError):
            conn.request("POST", req.path, body=req.body, headers=headers)
        response = conn.getresponse()
        response.read()
        return str(response.status)
    except TimeoutError:
        return "timeout"
    except (OSError, http.client.HTTPException):
        return "reset"
    finally:
        conn.close()


def send_grpc(call: grpc.UnaryUnaryMultiCallable, req: GrpcRequest, timeout: float) -> str:
    try:
        call(req.message, timeout=timeout)
        return "OK"
    except grpc.RpcError as e:
        return e.code().name


def _expected(req: HttpRequest | GrpcRequest, status: str) -> bool:
    return status in {str(s) for s in req.expect}


class Attacks:
    """``submit(i)``: the next malformed request (kinds in turn) on a small thread pool; inside
    ``with``, ``oversized`` requests every ``big_interval_s`` on a thread of their own;
    ``send(req)``: one request now, in the calling thread."""

    def __init__(
        self,
        grpc_url: str,
        http_url: str,
        malformed: list[HttpRequest | GrpcRequest],
        oversized: list[HttpRequest | GrpcRequest],
        big_interval_s: float,
        t0: float,
    ) -> None:
        self.http_url, self.t0 = http_url, t0
        self._channel = channel(grpc_url)
        self._call = model_infer(self._channel)
        self._malformed = itertools.cycle(malformed)
        self._oversized = itertools.cycle(oversized) if oversized else None
        self.big_interval_s = big_interval_s
        self.malformed: list[Outcome] = []
        self.big: list[Outcome] = []
        self._pool = ThreadPoolExecutor(max_workers=3, thread_name_prefix="malformed")
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._big_thread = threading.Thread(target=self._big_loop, name="oversized", daemon=True)

    def send(self, req: HttpRequest | GrpcRequest, timeout: float = ATTACK_TIMEOUT_S) -> Outcome:
        start = time.monotonic()
        if isinstance(req, HttpRequest):
            status = send_http(self.http_url, req, timeout)
        else:
            status = send_grpc(self._call, req, timeout)
        seconds = time.monotonic() - start
        return Outcome(req.kind, start - self.t0, seconds, status, _expected(req, status))

    def submit(self, i: int) -> None:
        req = next(self._malformed)
        self._pool.submit(self._record, req, self.malformed)

    def _record(self, req: HttpRequest | GrpcRequest, into: list[Outcome]) -> None:
        outcome = self.send(req)
        with self._lock:
            into.append(outcome)

    def _big_loop(self) -> None:
        assert self._oversized is not None
        while not self._stop.wait(self.big_interval_s):
            self._record(next(self._oversized), self.big)

    def __enter__(self) -> Attacks:
        if self._oversized is not None and self.big_interval_s > 0:
            self._big_thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._pool.shutdown(wait=True)
        if self._big_thread.is_alive():
            self._big_thread.join(ATTACK_TIMEOUT_S + 10)

    def close(self) -> None:
        """Close the gRPC channel (``send`` still works after the ``with`` block until then)."""
        self._channel.close()


@dataclass
class SlowSummary:
    started: int = 0
    server_closed: int = 0  # the server gave up on the partial body (timeout or cap)
    server_answered: dict[str, int] = field(default_factory=dict)  # status -> count
    client_gave_up: int = 0  # still open when the client stopped after hold_s
    seconds_to_server_close: list[float] = field(default_factory=list)


class SlowClients:
    """``count`` threads, each in turn opening an HTTP infer request whose body never completes:
    "trickle" sends 64 bytes every 0.5 s of a declared 1 MB, "stall" sends 4 MB of a declared
    8 MB and then nothing. A connection is held until the server closes it or ``hold_s``."""

    def __init__(self, http_url: str, path: str, count: int = 4, hold_s: float = 20.0) -> None:
        self.host, self.port = _split(http_url)
        self.path, self.count, self.hold_s = path, count, hold_s
        self.summary = SlowSummary()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._loop, args=(k,), name=f"slow-{k}", daemon=True)
            for k in range(count)
        ]

    def _loop(self, k: int) -> None:
        modes = itertools.cycle(("trickle", "stall") if k % 2 == 0 else ("stall", "trickle"))
        while not self._stop.is_set():
            try:
                self._one(next(modes))
            except OSError:
                self._stop.wait(0.5)

    def _one(self, mode: str) -> None:
        declared = 1_000_000 if mode == "trickle" else 8_000_000
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
        ).encode()
        with socket.create_connection((self.host, self.port), timeout=5) as s:
            with self._lock:
                self.summary.started += 1
            s.sendall(head + (b" " * 4_000_000 if mode == "stall" else b"{"))
            opened = time.monotonic()
            while time.monotonic() - opened < self.hold_s and not self._stop.is_set():
                readable, _, _ = select.select([s], [], [], 0.5)
                if readable:
                    self._server_spoke(s, opened)
                    return
                if mode == "trickle":
                    try:
                        s.sendall(b" " * 64)
                    except OSError:
                        self._closed(opened)
                        return
            with self._lock:
                self.summary.client_gave_up += 1

    def _server_spoke(self, s: socket.socket, opened: float) -> None:
        try:
            data = s.recv(256)
        except OSError:
            data = b""
        if not data:
            self._closed(opened)
            return
        status = data.split(b" ", 2)[1].decode(errors="replace") if b" " in data else "?"
        with self._lock:
            answered = self.summary.server_answered
            answered[status] = answered.get(status, 0) + 1
            self.summary.seconds_to_server_close.append(round(time.monotonic() - opened, 2))

    def _closed(self, opened: float) -> None:
        with self._lock:
            self.summary.server_closed += 1
            self.summary.seconds_to_server_close.append(round(time.monotonic() - opened, 2))

    def __enter__(self) -> SlowClients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(self.hold_s + 10)
