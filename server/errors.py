"""The gateway's exception family.

Every error carries ``code``: the canonical gRPC status code name (``"NOT_FOUND"``, ...). The
gRPC servicer (server/grpc_service.py) and the HTTP app (server/http_app.py) each translate it
to a transport status in exactly one place; metrics use the same name as the ``status`` label.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class. ``code`` is a gRPC status code name; ``message`` is shown to the client."""

    code: str = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(GatewayError):
    """Unknown model, variant, version or precision."""

    code = "NOT_FOUND"


class InvalidInput(GatewayError):
    """A request does not match the model's interface (names the input, expected vs got)."""

    code = "INVALID_ARGUMENT"


class PayloadTooLarge(GatewayError):
    """A request is bigger than the configured limit."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(GatewayError):
    """No variant that could serve the request is ready."""

    code = "UNAVAILABLE"


class DeadlineExceeded(GatewayError):
    """The client's deadline passed before the answer was ready."""

    code = "DEADLINE_EXCEEDED"


class Unauthenticated(GatewayError):
    """An inference call without the configured bearer token."""

    code = "UNAUTHENTICATED"


class Unsupported(GatewayError):
    """A protocol feature the gateway does not implement (e.g. shared memory)."""

    code = "UNIMPLEMENTED"


class InternalError(GatewayError):
    """An engine or upstream failed in a way that is not the client's fault."""

    code = "INTERNAL"


class ConfigError(GatewayError):
    """The repository or routing file is unusable; the CLI prints one line and exits 2."""

    code = "FAILED_PRECONDITION"


__all__ = [
    "ConfigError",
    "DeadlineExceeded",
    "GatewayError",
    "InternalError",
    "InvalidInput",
    "ModelNotFound",
    "PayloadTooLarge",
    "Unauthenticated",
    "Unavailable",
    "Unsupported",
]
