"""What an upstream that generates text (``Capabilities.generate``) takes and gives back.

A :class:`GenerationRequest` is one completion: a plain ``prompt`` or chat ``messages`` (the
upstream renders them with the model's own chat template) and checked
:class:`common.llm.SamplingParams`. ``generate(variant, request)`` returns a
:class:`Generation` once the request is admitted: its prompt is tokenized and fits the model's
context (errors are raised by ``generate`` itself, before any text, so a transport can still
answer with a status), and a sequence slot is held. Iterating it yields
:class:`common.llm.Chunk`s, the last with its ``finish_reason``; ``cancel()`` (the client went
away) stops the generation between two tokens and frees the slot.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from common.llm import Chunk, SamplingParams


@dataclass(frozen=True)
class GenerationRequest:
    params: SamplingParams
    prompt: str | None = None
    messages: Sequence[dict[str, Any]] | None = None  # chat: rendered by the model's template
    # the client gave no max_tokens: generate up to what fits the context (and the server's
    # limit) instead of ``params.max_tokens``
    fit_max_tokens: bool = False


class Generation(Protocol):
    prompt_tokens: int

    def __aiter__(self) -> AsyncIterator[Chunk]: ...

    def cancel(self) -> None: ...
