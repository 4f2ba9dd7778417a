"""The LLM exception family. Transports map :class:`LlmRequestError` to a client error (HTTP 400,
gRPC INVALID_ARGUMENT) and anything else of the family to a server error."""

from __future__ import annotations


class LlmError(Exception):
    """A decoder model cannot be loaded or cannot run."""


class LlmRequestError(LlmError):
    """A generation request is invalid; the message names the field."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class ContextLengthError(LlmRequestError):
    """The prompt (plus ``max_tokens``) does not fit the model's context."""
