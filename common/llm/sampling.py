"""Sampling parameters of one generation request, checked once, whatever the API it came from
(OpenAI's JSON, Triton's generate extension, the ``sampling_parameters`` input tensor)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from common.llm.errors import LlmRequestError

DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default
MAX_STOP_STRINGS = 4  # as OpenAI


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 means greedy decoding (``top_p`` and ``seed`` then have no effect)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise LlmRequestError("'max_tokens' must be an integer", "max_tokens")
        if self.max_tokens < 1:
            raise LlmRequestError(
                f"'max_tokens' must be at least 1, got {self.max_tokens}", "max_tokens"
            )
        for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise LlmRequestError(f"'{name}' must be a number", name)
            if not math.isfinite(value) or not low <= value <= high:
                raise LlmRequestError(
                    f"'{name}' must be between {low:g} and {high:g}, got {value}", name
                )
        if self.top_p == 0:
            raise LlmRequestError("'top_p' must be greater than 0", "top_p")
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0
        ):
            raise LlmRequestError("'seed' must be a non-negative integer", "seed")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise LlmRequestError(f"'stop' takes at most {MAX_STOP_STRINGS} strings", "stop")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LlmRequestError("'stop' must hold non-empty strings", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> SamplingParams:
        """From a JSON object (unknown keys are ignored: APIs carry more than sampling);
        ``stop`` may be one string or a list, as in OpenAI's API; null means the default."""
        kwargs: dict[str, Any] = {}
        for key in ("max_tokens", "temperature", "top_p", "seed"):
            if values.get(key) is not None:
                kwargs[key] = values[key]
        stop = values.get("stop")
        if stop is not None:
            if isinstance(stop, str):
                stop = [stop]
            if not isinstance(stop, list):
                raise LlmRequestError("'stop' must be a string or a list of strings", "stop")
            kwargs["stop"] = tuple(stop)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str | bytes) -> SamplingParams:
        try:
            values = json.loads(text) if text else {}
        except (ValueError, UnicodeDecodeError) as e:
            raise LlmRequestError(f"sampling parameters are not valid JSON: {e}") from e
        if not isinstance(values, dict):
            raise LlmRequestError("sampling parameters must be a JSON object")
        return cls.from_mapping(values)

    def to_json(self) -> str:
        values = asdict(self)
        values["stop"] = list(self.stop)
        return json.dumps(values)
