"""Decoder LLM variants in the embedded upstream: one onnxruntime-genai model per variant.

Per variant, :class:`LlmRunner` loads the genai folder once (:class:`common.llm.GenaiModel`;
onnxruntime-genai is imported then, so a repository without an LLM never imports it) and
admits requests:

- the prompt (or the chat ``messages`` rendered with the model's own template) is tokenized and
  checked against the context and the ``max_tokens`` limit on a helper thread, before the
  request waits for anything: a bad request is refused at once, with nothing streamed;
- at most ``sequences`` requests generate at once (each with its own generator and KV cache, on
  its own worker thread); up to ``queue`` more wait for a free slot, in arrival order. A request
  beyond that is refused with UNAVAILABLE "queue full for <variant>" (HTTP 503) and counted in
  ``precision_serve_queue_rejections_total``;
- generation runs on the worker thread (``common.llm.stream_text``); each chunk is handed to the
  event loop with ``call_soon_threadsafe`` into the request's asyncio queue;
- ``cancel()`` (the client went away) sets the flag ``stream_text`` reads between two tokens: the
  thread stops and frees its slot. The slot is freed when the thread ends, not when the client
  leaves, so ``precision_serve_llm_active_sequences`` counts what really runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from common.llm import Chunk, GenaiModel, LlmError, SamplingParams, stream_text
from server import metrics
from server.catalog import Variant
from server.errors import InvalidGeneration, Unavailable, from_llm_error
from server.upstreams.generation import GenerationRequest

log = logging.getLogger(__name__)

_END = object()


class ThreadGeneration:
    """One request's chunks, produced on a worker thread, read on the event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, model: GenaiModel, tokens: list[int], params: Any
    ) -> None:
        self.prompt_tokens = len(tokens)
        self._loop = loop
        self._model = model
        self._tokens = tokens
        self._params = params
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._cancelled = threading.Event()
        self._done = False

    def run(self) -> None:
        """The worker thread's part: generate, hand each chunk (or the error) to the loop."""
        try:
            for chunk in stream_text(
                self._model, self._tokens, self._params, self._cancelled.is_set
            ):
                self._put(chunk)
        except BaseException as e:  # handed to the reader: the thread never dies silently
            self._put(e)
        finally:
            self._put(_END)

    def _put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody reads
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def cancel(self) -> None:
        self._cancelled.set()

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            while not self._done:
                item = await self._queue.get()
                if item is _END:
                    self._done = True
                    return
                if isinstance(item, LlmError):
                    raise from_llm_error(item) from item
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not self._done:  # the reader stopped early (client gone, error): stop the thread
                self.cancel()


class LlmRunner:
    """One LLM variant: its model, its sequence slots and its queue (module docstring)."""

    def __init__(
        self, variant: Variant, model: GenaiModel, sequences: int, queue: int, max_tokens: int
    ) -> None:
        self.variant = variant
        self.model = model
        self.sequences = max(1, sequences)
        self.queue = max(0, queue)
        self.max_tokens = max_tokens
        self._slots = asyncio.Semaphore(self.sequences)
        self._waiting = 0
        self._executor = ThreadPoolExecutor(
            self.sequences, thread_name_prefix=f"llm-{variant.name}"
        )
        labels = (variant.model, variant.precision)
        self._active = metrics.LLM_ACTIVE_SEQUENCES.labels(*labels)
        self._queued = metrics.LLM_QUEUED.labels(*labels)
        self._rejections = metrics.QUEUE_REJECTIONS.labels(*labels)
        self._closed = False
        self._running: set[ThreadGeneration] = set()

    @classmethod
    def load(
        cls, variant: Variant, threads: int, sequences: int, queue: int, max_tokens: int
    ) -> LlmRunner:
        """Blocking (run it on a loader thread); LlmError when the folder cannot be loaded."""
        model = GenaiModel(variant.path, threads or None)
        return cls(variant, model, sequences, queue, max_tokens)

    def _prompt_tokens(self, request: GenerationRequest) -> tuple[list[int], SamplingParams]:
        """The prompt's tokens and the parameters to run (``max_tokens`` fitted when the client
        left it out); InvalidGeneration when they cannot run."""
        params: SamplingParams = request.params
        if not request.fit_max_tokens and params.max_tokens > self.max_tokens:
            raise InvalidGeneration(
                f"'max_tokens' is {params.max_tokens}, over this server's limit of "
                f"{self.max_tokens} tokens per request",
                "max_tokens",
            )
        try:
            if request.messages is not None:
                text = self.model.chat_prompt(request.messages)
            else:
                text = request.prompt or ""
            tokens = self.model.encode(text)
            if request.fit_max_tokens:
                room = self.model.context_length - len(tokens)
                params = dataclasses.replace(params, max_tokens=max(1, min(self.max_tokens, room)))
            self.model.check_fits(len(tokens), params.max_tokens)
        except LlmError as e:
            raise from_llm_error(e) from e
        return tokens, params

    async def generate(self, request: GenerationRequest) -> ThreadGeneration:
        if self._closed:
            raise Unavailable(f"variant {self.variant.name} is unloading")
        tokens, params = await asyncio.to_thread(self._prompt_tokens, request)
        if self._slots.locked() and self._waiting >= self.queue:
            self._rejections.inc()
            raise Unavailable(
                f"queue full for {self.variant.name}: {self.sequences} sequences generating, "
                f"{self._waiting} waiting"
            )
        self._waiting += 1
        self._queued.inc()
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
            self._queued.dec()
        loop = asyncio.get_running_loop()
        generation = ThreadGeneration(loop, self.model, tokens, params)
        self._active.inc()
        self._running.add(generation)
        try:
            future = loop.run_in_executor(self._executor, generation.run)
        except BaseException:
            self._release(generation)
            raise
        future.add_done_callback(lambda _: self._release(generation))
        return generation

    def _release(self, generation: ThreadGeneration) -> None:
        self._running.discard(generation)
        self._active.dec()
        self._slots.release()

    async def close(self, cancel: bool = True) -> None:
        """Stop admitting and wait for the running sequences' threads: stopped at their next
        token (``cancel``: shutdown, after the gateway's grace let the streams it waited for
        finish) or run to their end (an unload through model control)."""
        self._closed = True
        for generation in list(self._running) if cancel else ():
            generation.cancel()
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._executor.shutdown(wait=True)
        )


__all__ = ["LlmRunner", "ThreadGeneration"]
