"""The transports' options: where they listen (``listen``) and what a client may cost (``limits``).

Declared once here (common/options.py builds ``--help``, the worker hand-off and docs/options.md
from these dataclasses).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from common.options import option, parse_pairs
from server.errors import ConfigError
from server.transports.http.app import DEFAULT_BODY_TIMEOUT_S, HttpLimits
from server.transports.http.limits import DEFAULT_MAX_CONNECTIONS
from server.transports.request_bounds import LIMIT_MODES

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
PORT_NAMES = ("http", "grpc", "metrics")


@dataclass(frozen=True)
class Ports:
    """Triton's default ports; 0 lets the OS pick."""

    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    def __post_init__(self) -> None:
        for name in PORT_NAMES:
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"--ports {name} must be 0..65535, got {port}")

    @classmethod
    def parse(cls, text: str) -> Ports:
        """``"http=8000,grpc=8001,metrics=8002"`` (keys left out keep their default); ``"0"``:
        the OS picks all three."""
        if text.strip() == "0":
            return cls(0, 0, 0)
        pairs = parse_pairs(text, PORT_NAMES, "--ports")
        values: dict[str, int] = {}
        for key, value in pairs.items():
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(f"--ports {key}={value!r} is not a port number") from None
        return cls(**values)

    def __str__(self) -> str:
        return ",".join(f"{name}={getattr(self, name)}" for name in PORT_NAMES)


@dataclass(frozen=True)
class Tls:
    cert: Path
    key: Path

    @classmethod
    def parse(cls, text: str) -> Tls:
        cert, sep, key = text.partition(",")
        if not (sep and cert.strip() and key.strip()) or "," in key:
            raise ConfigError(f"--tls takes CERT,KEY (two PEM files), got {text!r}")
        return cls(Path(cert.strip()), Path(key.strip()))

    def __str__(self) -> str:
        return f"{self.cert},{self.key}"


@dataclass
class ListenOptions:
    """Where the gateway listens: gRPC and HTTP (TLS when ``--tls``), Prometheus metrics."""

    group: ClassVar[str] = "listen"

    host: str = option("127.0.0.1", help="address to bind", metavar="ADDRESS")
    ports: Ports = option(
        default_factory=Ports,
        parse=Ports.parse,
        metavar="http=P,grpc=P,metrics=P",
        help="ports to bind; a key left out keeps its default; 0 alone: the OS picks all three",
    )
    tls: Tls | None = option(
        None,
        parse=Tls.parse,
        metavar="CERT,KEY",
        help="PEM certificate and private key: serve gRPC and HTTP over TLS only (metrics stay "
        "plain)",
    )

    @property
    def grpc_port(self) -> int:
        return self.ports.grpc

    @property
    def http_port(self) -> int:
        return self.ports.http

    @property
    def metrics_port(self) -> int:
        return self.ports.metrics


def _calls(text: str) -> int | None:
    """``--grpc-max-concurrent-rpcs``: a number of calls, or ``auto`` (None)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"expected a number or 'auto', got {text!r}") from None


def _auto(value: int | None) -> str:
    return "auto" if value is None else str(value)


@dataclass
class LimitsOptions:
    """What one client or request may cost the gateway (server/transports/request_bounds.py,
    server/transports/http/limits.py)."""

    group: ClassVar[str] = "limits"

    max_request_bytes: int = option(
        DEFAULT_MAX_REQUEST_BYTES,
        parse=int,
        metavar="BYTES",
        help="largest accepted request: gRPC message, HTTP body, decoded inputs "
        "(RESOURCE_EXHAUSTED / 413 above)",
    )
    message_limit: str = option(
        "models",
        choices=LIMIT_MODES,
        help="models: gRPC refuses messages larger than the models' largest valid request "
        "(when every input is bounded; at most --max-request-bytes) before they reach Python; "
        "max-request-bytes: always --max-request-bytes",
    )
    grpc_max_concurrent_rpcs: int | None = option(
        None,
        parse=_calls,
        format=_auto,
        metavar="N|auto",
        help="gRPC calls handled at once; more get RESOURCE_EXHAUSTED (0: no limit; auto: as "
        "many as 8 GiB of messages at the gRPC message limit, 128..4096)",
        default_text="auto",
    )
    http_body_timeout: float = option(
        DEFAULT_BODY_TIMEOUT_S,
        parse=float,
        metavar="SECONDS",
        help="seconds a client has to send an HTTP request body (408 after), and the headers "
        "of any request on a connection (closed after)",
    )
    http_max_connections: int = option(
        DEFAULT_MAX_CONNECTIONS,
        parse=int,
        metavar="N",
        help="open HTTP connections per process; more are answered 503 and closed (0: no cap)",
    )

    def __post_init__(self) -> None:
        if self.max_request_bytes < 1024:
            raise ConfigError(f"--max-request-bytes must be >= 1024, got {self.max_request_bytes}")
        if self.message_limit not in LIMIT_MODES:
            raise ConfigError(
                f"--message-limit must be one of {', '.join(LIMIT_MODES)}, "
                f"got {self.message_limit!r}"
            )
        if self.grpc_max_concurrent_rpcs is not None and self.grpc_max_concurrent_rpcs < 0:
            raise ConfigError(
                f"--grpc-max-concurrent-rpcs must be >= 0, got {self.grpc_max_concurrent_rpcs}"
            )
        HttpLimits(self.http_body_timeout, self.http_max_connections)  # checks its values

    @property
    def http(self) -> HttpLimits:
        return HttpLimits(self.http_body_timeout, self.http_max_connections)
