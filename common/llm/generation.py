"""One onnxruntime-genai model and the token stream of one request.

:class:`GenaiModel` loads an onnxruntime-genai folder (``genai_config.json``, ``model.onnx``,
the tokenizer and chat template the builder copied there) once; any number of requests may
stream from it at the same time, each with its own ``Generator`` (the model's weights are
shared; each generator holds its own KV cache, sized to the request's prompt plus
``max_tokens``, not to the model's whole context).

:func:`stream_text` turns one request into :class:`Chunk`s of text: stop strings are held back
until they can no longer be a prefix of one, and the last chunk carries the finish reason
(``"stop"``: end of sequence or a stop string; ``"length"``: ``max_tokens`` reached;
``"cancelled"``: the caller's ``cancelled()`` said so between two tokens).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.llm.errors import ContextLengthError, LlmError, LlmRequestError
from common.llm.sampling import SamplingParams

GENAI_CONFIG = "genai_config.json"

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"


@dataclass(frozen=True)
class Chunk:
    """New text of one request. ``tokens``: how many generated tokens this chunk accounts for
    (text held back for a possible stop string is counted when its tokens are generated)."""

    text: str
    tokens: int
    finish_reason: str | None = None


def read_genai_config(folder: Path) -> dict[str, Any]:
    path = Path(folder) / GENAI_CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise LlmError(f"{path}: not a readable onnxruntime-genai config: {e}") from e
    if not isinstance(config, dict) or "model" not in config:
        raise LlmError(f"{path}: no 'model' section (not an onnxruntime-genai folder)")
    return config


class GenaiModel:
    """An onnxruntime-genai model folder, loaded once. ``threads``: intra-op threads of its
    ONNX Runtime session (None: ONNX Runtime's default)."""

    def __init__(self, folder: Path | str, threads: int | None = None) -> None:
        import onnxruntime_genai as og

        self.folder = Path(folder)
        config = read_genai_config(self.folder)
        self.context_length = int(config["model"].get("context_length", 0)) or int(
            config.get("search", {}).get("max_length", 0)
        )
        if self.context_length < 2:
            raise LlmError(f"{self.folder / GENAI_CONFIG}: no context_length")
        try:
            og_config = og.Config(str(self.folder))
            if threads is not None:
                options = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
                og_config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
            self._model = og.Model(og_config)
            self._tokenizer = og.Tokenizer(self._model)
        except Exception as e:  # onnxruntime-genai raises RuntimeError with its own message
            raise LlmError(f"{self.folder}: onnxruntime-genai cannot load the model: {e}") from e
        self.eos_token_ids = frozenset(int(t) for t in self._tokenizer.eos_token_ids)
        self._og = og
        self._lock = threading.Lock()  # the tokenizer is not documented as thread-safe

    # -- text and tokens --------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        with self._lock:
            return [int(t) for t in self._tokenizer.encode(text)]

    def decode(self, tokens: Sequence[int]) -> str:
        with self._lock:
            return str(self._tokenizer.decode(list(tokens)))

    def chat_prompt(self, messages: Sequence[dict[str, Any]]) -> str:
        """The prompt the model's own chat template makes of OpenAI-style ``messages``
        (``content`` a string or a list of ``{"type": "text", "text": ...}`` parts), ending
        with the assistant's turn."""
        plain: list[dict[str, str]] = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise LlmRequestError(f"'messages[{i}]' must be an object", "messages")
            role, content = message.get("role"), message.get("content")
            if role not in ("system", "user", "assistant", "developer", "tool"):
                raise LlmRequestError(f"'messages[{i}].role' is not a valid role", "messages")
            if isinstance(content, list):
                try:
                    content = "".join(
                        part["text"] for part in content if part.get("type") == "text"
                    )
                except (TypeError, KeyError, AttributeError) as e:
                    raise LlmRequestError(
                        f"'messages[{i}].content' parts must be text parts", "messages"
                    ) from e
            if not isinstance(content, str):
                raise LlmRequestError(f"'messages[{i}].content' must be a string", "messages")
            plain.append({"role": "system" if role == "developer" else role, "content": content})
        if not plain:
            raise LlmRequestError("'messages' must not be empty", "messages")
        with self._lock:
            return str(
                self._tokenizer.apply_chat_template(json.dumps(plain), add_generation_prompt=True)
            )

    def check_fits(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens < 1:
            raise LlmRequestError("the prompt is empty", "prompt")
        if prompt_tokens + max_tokens > self.context_length:
            raise ContextLengthError(
                f"This model's maximum context length is {self.context_length} tokens. "
                f"However, you requested {prompt_tokens + max_tokens} tokens "
                f"({prompt_tokens} in the prompt, {max_tokens} in the completion). "
                "Please reduce the prompt or the completion length.",
                "max_tokens",
            )

    # -- generation -------------------------------------------------------------------------
    def generator(
        self, prompt: Sequence[int], params: SamplingParams, ignore_eos: bool = False
    ) -> Any:
        """An onnxruntime-genai ``Generator`` with the prompt appended (the prefill runs here).
        ``ignore_eos``: generate all ``max_tokens`` tokens (the builder's speed runs)."""
        self.check_fits(len(prompt), params.max_tokens)
        og = self._og
        gp = og.GeneratorParams(self._model)
        options: dict[str, Any] = {"max_length": len(prompt) + params.max_tokens}
        if ignore_eos:
            options["min_length"] = options["max_length"]
        if params.greedy:
            options["do_sample"] = False
        else:
            options.update(
                do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0
            )
            if params.seed is not None:
                options["random_seed"] = params.seed
        gp.set_search_options(**options)
        generator = og.Generator(self._model, gp)
        generator.append_tokens(list(prompt))
        return generator

    def token_stream(self) -> Any:
        return self._tokenizer.create_stream()


def stream_text(
    model: GenaiModel,
    prompt: Sequence[int],
    params: SamplingParams,
    cancelled: Callable[[], bool] = lambda: False,
) -> Iterator[Chunk]:
    """Generate for one request; see the module docstring. The prefill runs before the first
    chunk (so the first chunk's arrival is the time to first token)."""
    generator = model.generator(prompt, params)
    decoder = model.token_stream()
    held = ""  # text that may still be the start of a stop string
    pending_tokens = 0
    generated = 0
    ended = False  # the model produced an end-of-sequence token
    longest_stop = max((len(s) for s in params.stop), default=0)
    while True:
        if cancelled():
            yield Chunk(held, pending_tokens, FINISH_CANCELLED)
            return
        if generator.is_done():
            reason = FINISH_STOP if ended or generated < params.max_tokens else FINISH_LENGTH
            yield Chunk(held, pending_tokens, reason)
            return
        generator.generate_next_token()
        token = int(generator.get_next_tokens()[0])
        generated += 1
        pending_tokens += 1
        if token in model.eos_token_ids:
            ended = True
            continue  # is_done() says so next; the end-of-sequence token is not text
        held += decoder.decode(token)
        if params.stop:
            cut = min((i for s in params.stop if (i := held.find(s)) >= 0), default=-1)
            if cut >= 0:
                yield Chunk(held[:cut], pending_tokens, FINISH_STOP)
                return
            safe = len(held) - (longest_stop - 1)
            if safe <= 0:
                continue
            text, held = held[:safe], held[safe:]
        else:
            text, held = held, ""
        if text:
            yield Chunk(text, pending_tokens)
            pending_tokens = 0
