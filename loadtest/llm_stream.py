"""One streamed OpenAI completion, timed on the client: server-sent events parsed here, over
``http.client`` (gevent-patched inside Locust, plain elsewhere), so the same code serves the
Locust user (loadtest/locustfile_llm.py), the benchmark and the tests.

    conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=60)
    result = stream_completion(conn, completion_request("smollm2", "int4", "Once upon", 64))
    result.ttft_s, result.output_tokens, result.itl_samples()

Timing: ``ttft_s`` is the time from sending the request to the first event that carries text
(the first *content* chunk; a chunk with an empty text or only a role is not a token);
``chunk_offsets_s`` the arrival of every content chunk. Inter-token latency is per token: the
gateway may put several tokens in one chunk (a stop string held back, a multi-byte character),
so when the final ``usage`` says the request produced more tokens than content chunks, each gap
after the first chunk is divided by the mean tokens per later chunk (see :meth:`itl_samples`).
Without ``usage`` each content chunk counts as one token.
"""

from __future__ import annotations

import http.client
import itertools
import json
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

DONE = "[DONE]"
APIS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class StreamError(Exception):
    """The stream broke its protocol (bad JSON, no [DONE]) or the server sent an error."""


def sse_data(lines: Iterable[bytes | str]) -> Iterator[str]:
    """The ``data`` of each server-sent event, as the HTML standard's event-stream parsing
    defines it: ``field: value`` lines (one optional space after the colon), several ``data``
    lines joined with newlines, an empty line dispatches the event, lines starting with a colon
    are comments; events without data are not dispatched."""
    data: list[str] = []
    for raw in lines:
        line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        line = line.rstrip("\r\n")
        if not line:
            if data:
                yield "\n".join(data)
                data = []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if name == "data":
            data.append(value)
    if data:  # a stream cut off before its last empty line still delivers what it had
        yield "\n".join(data)


def completion_request(
    model: str,
    precision: str | None,
    prompt: str,
    max_tokens: int,
    *,
    api: str = "completions",
    temperature: float = 0.0,
    via: str = "parameter",
) -> tuple[str, dict[str, Any]]:
    """(path, body) of a streamed request for ``model`` at ``precision`` (None: the gateway's
    policy picks). ``via``: ``parameter`` names it ``model:precision``, ``variant`` names the
    variant ``model_precision`` (both are the contract's OpenAI names)."""
    if api not in APIS:
        raise ValueError(f"api must be one of {', '.join(APIS)}, got {api!r}")
    name = model
    if precision is not None:
        name = f"{model}_{precision}" if via == "variant" else f"{model}:{precision}"
    body: dict[str, Any] = {
        "model": name,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return APIS[api], body


@dataclass
class StreamResult:
    """One request as the client saw it (times in seconds)."""

    start: float  # wall clock when it was sent
    latency_s: float = 0.0  # sent -> end of the stream (or the error)
    ttft_s: float | None = None  # sent -> first content chunk
    chunk_offsets_s: list[float] = field(default_factory=list)  # sent -> each content chunk
    completion_tokens: int | None = None  # usage.completion_tokens
    prompt_tokens: int | None = None  # usage.prompt_tokens
    served: str = ""  # the response's precision (x-precision header, else the model field)
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        if self.completion_tokens is not None:
            return self.completion_tokens
        return len(self.chunk_offsets_s)

    def itl_samples(self) -> list[float]:
        """Inter-token latencies, one per gap between content chunks, each divided by the
        tokens that gap stands for. The first chunk is taken as one token (its time is TTFT);
        the other ``output_tokens - 1`` tokens are spread evenly over the later chunks. With
        one token per chunk (the usual case) these are the plain gaps."""
        t = self.chunk_offsets_s
        if len(t) < 2:
            return []
        per_gap = max(self.output_tokens - 1, len(t) - 1) / (len(t) - 1)
        return [(b - a) / per_gap for a, b in itertools.pairwise(t)]

    def decode_s(self) -> float | None:
        """First content chunk -> last: the time of the tokens after the first."""
        t = self.chunk_offsets_s
        return t[-1] - t[0] if len(t) >= 2 else None


def _chunk_text(chunk: dict[str, Any]) -> tuple[str, str | None]:
    """(new text, finish_reason) of one chunk of either API."""
    choices = chunk.get("choices") or []
    if not choices:
        return "", None
    c = choices[0]
    text = c.get("text")
    if text is None:
        text = (c.get("delta") or {}).get("content") or ""
    return text, c.get("finish_reason")


def _precision_of(model_field: str) -> str:
    """``smollm2:int4`` -> ``int4`` (the contract's OpenAI name of a variant)."""
    return model_field.rsplit(":", 1)[1] if ":" in model_field else ""


def read_stream(
    lines: Iterable[bytes | str], result: StreamResult, started: float, header_precision: str = ""
) -> StreamResult:
    """Fill ``result`` from an event stream whose request left at ``started``
    (``time.perf_counter()``); raises StreamError on a protocol error or an error event."""
    done = False
    result.served = header_precision
    for data in sse_data(lines):
        now = time.perf_counter() - started
        if data == DONE:
            done = True
            break
        try:
            chunk = json.loads(data)
        except ValueError:
            raise StreamError(f"event is not JSON: {data[:80]!r}") from None
        if "error" in chunk:
            err = chunk["error"]
            message = err.get("message", err) if isinstance(err, dict) else err
            raise StreamError(f"error event: {message}")
        text, finish = _chunk_text(chunk)
        if text:
            if result.ttft_s is None:
                result.ttft_s = now
            result.chunk_offsets_s.append(now)
        if finish:
            result.finish_reason = finish
        usage = chunk.get("usage")
        if usage:
            result.completion_tokens = int(usage.get("completion_tokens", 0))
            result.prompt_tokens = int(usage.get("prompt_tokens", 0))
        if not result.served and chunk.get("model"):
            result.served = _precision_of(str(chunk["model"]))
    if not done:
        raise StreamError("the stream ended without data: [DONE]")
    return result


def stream_completion(
    conn: http.client.HTTPConnection,
    request: tuple[str, dict[str, Any]],
    *,
    expect_precision: str | None = None,
) -> StreamResult:
    """Send one streamed request on ``conn`` and time it; never raises for what the server or
    the network did (``result.error`` says it). A response served by another precision than
    ``expect_precision`` (a fallback) is an error, so its time is not given to the wrong one."""
    path, body = request
    payload = json.dumps(body).encode()
    result = StreamResult(start=time.time())
    started = time.perf_counter()
    try:
        try:
            resp = _send(conn, path, payload)
        except STALE:
            # a kept-alive connection the server closed while idle fails on first use: once,
            # on a fresh connection (as urllib3 does), timed from the second send
            conn.close()
            result.start, started = time.time(), time.perf_counter()
            resp = _send(conn, path, payload)
        if resp.status != 200:
            text = resp.read().decode("utf-8", "replace")
            try:
                message = json.loads(text)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = text[:200]
            raise StreamError(f"HTTP {resp.status}: {message}")
        read_stream(iter(resp.readline, b""), result, started, resp.getheader("x-precision", ""))
        resp.read()  # the rest (nothing after [DONE]) so the connection can be reused
        if expect_precision and result.served and result.served != expect_precision:
            raise StreamError(f"served by {result.served}, asked for {expect_precision}")
    except (StreamError, OSError, http.client.HTTPException) as e:
        result.error = f"{type(e).__name__}: {e}"
        conn.close()  # the next request opens a fresh connection
    result.latency_s = time.perf_counter() - started
    return result


# How a kept-alive connection that the server closed shows on its next request.
STALE = (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected)


def _send(conn: http.client.HTTPConnection, path: str, payload: bytes) -> http.client.HTTPResponse:
    conn.request(
        "POST",
        path,
        body=payload,
        headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
    )
    return conn.getresponse()
