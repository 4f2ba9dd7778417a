"""The gateway's exception family.

Every error carries ``code``: the canonical gRPC status code name (``"NOT_FOUND"``, ...). The
gRPC servicer (server/transports/grpc/service.py) and the HTTP app (server/transports/http/app.py)
each translate it to a transport status in exactly one place; metrics use the same name as the
``status`` label.
Internal errors (``INTERNAL``, or any other exception) reach clients only as
``internal error, id=...`` (:func:`client_message`); the log has the id and the full text, so
engine messages and replica addresses stay inside.
"""

from __future__ import annotations

import logging
import secrets

from common.llm.errors import ContextLengthError, LlmError, LlmRequestError

log = logging.getLogger(__name__)


class GatewayError(Exception):
    """Base class. ``code`` is a gRPC status code name; ``message`` is shown to the client."""

    code: str = "INTERNAL"
    # set by the core once it counted the error in precision_serve_requests_total; the
    # transports count the rest (parse, auth and size errors raised before the core)
    counted: bool = False
    http_status: int | None = None  # an HTTP status other than the code's usual one
    # what an API with structured errors (OpenAI's) reports beside the message: the request
    # field at fault and a machine-readable reason ("context_length_exceeded")
    param: str | None = None
    reason: str | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelNotFound(GatewayError):
    """Unknown model, variant, version or precision."""

    code = "NOT_FOUND"


class InvalidInput(GatewayError):
    """A request does not match the model's interface (names the input, expected vs got)."""

    code = "INVALID_ARGUMENT"


class InvalidVersion(InvalidInput):
    """A model version that is not a number > 0: INVALID_ARGUMENT over gRPC, and 404 over HTTP,
    where Triton's routes take digits only (server/dataplane/wording.py)."""

    http_status = 404


class InvalidGeneration(InvalidInput):
    """A generation request that cannot run: a field out of range (``param`` names it), a prompt
    over the model's context (``reason`` = "context_length_exceeded")."""

    def __init__(self, message: str, param: str | None = None, reason: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.reason = reason


class PayloadTooLarge(GatewayError):
    """A request is bigger than the configured limit."""

    code = "RESOURCE_EXHAUSTED"


class Unavailable(GatewayError):
    """No variant that could serve the request is ready."""

    code = "UNAVAILABLE"


class DeadlineExceeded(GatewayError):
    """The client's deadline passed before the answer was ready."""

    code = "DEADLINE_EXCEEDED"


class BodyTimeout(DeadlineExceeded):
    """The client did not send its whole HTTP body within ``--http-body-timeout`` (408)."""

    http_status = 408


class ClientDisconnected(GatewayError):
    """The client closed the connection before its request was read (nginx's 499)."""

    code = "CANCELLED"
    http_status = 499


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


CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"


def from_llm_error(error: LlmError) -> GatewayError:
    """The one translation of common.llm's errors: a request error is the client's
    (INVALID_ARGUMENT, the field named), anything else an engine failure (INTERNAL)."""
    if isinstance(error, ContextLengthError):
        return InvalidGeneration(str(error), error.field, CONTEXT_LENGTH_EXCEEDED)
    if isinstance(error, LlmRequestError):
        return InvalidGeneration(str(error), error.field)
    return InternalError(f"{type(error).__name__}: {error}")


def client_message(error: BaseException, where: str = "") -> str:
    """What a client is told about ``error``: a gateway error's own message, except for internal
    errors, which get a fresh id that is logged with the full text (and the traceback of an
    unexpected exception)."""
    if isinstance(error, GatewayError) and error.code != "INTERNAL":
        return error.message
    error_id = secrets.token_hex(4)
    text = error.message if isinstance(error, GatewayError) else f"{type(error).__name__}: {error}"
    cause = error.__cause__ if isinstance(error, GatewayError) else error
    trace = cause if isinstance(cause, BaseException) else None
    log.error("internal error id=%s %s: %s", error_id, where, text, exc_info=trace)
    return f"internal error, id={error_id}"


__all__ = [
    "BodyTimeout",
    "ClientDisconnected",
    "ConfigError",
    "DeadlineExceeded",
    "GatewayError",
    "InternalError",
    "InvalidGeneration",
    "InvalidInput",
    "InvalidVersion",
    "ModelNotFound",
    "PayloadTooLarge",
    "Unauthenticated",
    "Unavailable",
    "Unsupported",
    "client_message",
    "from_llm_error",
]
