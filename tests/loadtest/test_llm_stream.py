"""Server-sent events and TTFT / inter-token latency of the LLM load test (loadtest/llm_stream.py)
on a stream recorded from the gateway (tests/data/loadtest/completions_stream.sse: tinyllm at
int4, 5 tokens, usage included) and on edge cases of the event-stream format. The live gateway
is in test_llm_loadtest.py."""

from __future__ import annotations

import http.client
import json
import socketserver
import threading
import time
from pathlib import Path

import pytest

from loadtest.llm_stream import (
    StreamError,
    StreamResult,
    completion_request,
    read_stream,
    sse_data,
    stream_completion,
)

RECORDED = Path(__file__).resolve().parents[1] / "data" / "loadtest" / "completions_stream.sse"


def test_sse_data_follows_the_event_stream_format() -> None:
    lines = [
        ": a comment\n",
        "data: one\r\n",
        "\r\n",
        "data:two\n",  # no space after the colon
        "data:  three\n",  # only one space is stripped
        "\n",
        "event: ping\n",  # an event without data is not dispatched
        "\n",
        b"data: bytes\n",
        "\n",
        "data: cut",  # a stream cut before its last empty line still delivers
    ]
    assert list(sse_data(lines)) == ["one", "two\n three", "bytes", "cut"]


def test_a_recorded_gateway_stream_gives_tokens_chunks_and_precision() -> None:
    lines = RECORDED.read_bytes().splitlines(keepends=True)
    result = read_stream(iter(lines), StreamResult(start=time.time()), time.perf_counter())
    assert result.completion_tokens == 5 and result.prompt_tokens == 1
    assert len(result.chunk_offsets_s) == 5  # the finish-only chunk and usage carry no text
    assert result.served == "int4"  # from the model field ("tinyllm:int4"): no header here
    assert result.finish_reason == "length"
    assert result.ttft_s == result.chunk_offsets_s[0]
    assert len(result.itl_samples()) == 4


def test_header_precision_wins_over_the_model_field() -> None:
    lines = RECORDED.read_bytes().splitlines(keepends=True)
    r = read_stream(iter(lines), StreamResult(start=0.0), time.perf_counter(), "fp32")
    assert r.served == "fp32"


def _event(doc: object) -> list[str]:
    return [f"data: {doc if isinstance(doc, str) else json.dumps(doc)}\n", "\n"]


def _chunk(text: str) -> dict[str, object]:
    return {"model": "m:int8", "choices": [{"index": 0, "text": text, "finish_reason": None}]}


def test_chat_deltas_count_content_not_the_role() -> None:
    role = {"model": "m:int8", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}
    text = {"model": "m:int8", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}
    lines = [*_event(role), *_event(text), *_event(text), *_event("[DONE]")]
    r = read_stream(iter(lines), StreamResult(start=0.0), time.perf_counter())
    assert len(r.chunk_offsets_s) == 2 and r.completion_tokens is None
    assert r.output_tokens == 2  # without usage, a content chunk is a token


@pytest.mark.parametrize(
    "lines, message",
    [
        ([*_event(_chunk("a"))], r"without data: \[DONE\]"),
        ([*_event("{not json")], "not JSON"),
        ([*_event({"error": {"message": "prompt too long", "type": "x"}})], "prompt too long"),
    ],
)
def test_broken_streams_are_errors(lines: list[str], message: str) -> None:
    with pytest.raises(StreamError, match=message):
        read_stream(iter(lines), StreamResult(start=0.0), time.perf_counter())


def test_itl_is_per_token_when_chunks_hold_several_tokens() -> None:
    # 4 chunks, 7 tokens: the first chunk is one token, the 6 others spread over 3 gaps
    r = StreamResult(start=0.0, chunk_offsets_s=[0.1, 0.3, 0.5, 0.9], completion_tokens=7)
    assert r.itl_samples() == pytest.approx([0.1, 0.1, 0.2])
    assert r.decode_s() == pytest.approx(0.8)
    # one token per chunk: the plain gaps
    one = StreamResult(start=0.0, chunk_offsets_s=[0.1, 0.3, 0.4], completion_tokens=3)
    assert one.itl_samples() == pytest.approx([0.2, 0.1])
    assert StreamResult(start=0.0, chunk_offsets_s=[0.1]).itl_samples() == []


def test_completion_request_names_the_variant_as_the_contract_says() -> None:
    path, body = completion_request("smollm2", "int4", "Hi", 8)
    assert path == "/v1/completions" and body["model"] == "smollm2:int4"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    path, body = completion_request("smollm2", "int8", "Hi", 8, api="chat", via="variant")
    assert path == "/v1/chat/completions" and body["model"] == "smollm2_int8"
    assert body["messages"] == [{"role": "user", "content": "Hi"}]
    assert completion_request("smollm2", None, "Hi", 8)[1]["model"] == "smollm2"
    with pytest.raises(ValueError, match="api must be"):
        completion_request("m", "fp32", "Hi", 8, api="embeddings")


class _OneRequestPerConnection(socketserver.BaseRequestHandler):
    """Answers one request with the recorded stream, keep-alive in its headers, then closes
    the connection: what a server's idle timeout does to a kept-alive connection."""

    def handle(self) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.request.recv(65536)
        head, _, body = data.partition(b"\r\n\r\n")
        sizes = [h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
        length = int(sizes[0].split(b":")[1])
        while len(body) < length:
            body += self.request.recv(65536)
        stream = RECORDED.read_bytes()
        self.request.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-precision: int4\r\n"
            + f"content-length: {len(stream)}\r\n\r\n".encode()
            + stream
        )


def test_a_kept_alive_connection_closed_by_the_server_is_reopened_once() -> None:
    server = socketserver.TCPServer(("127.0.0.1", 0), _OneRequestPerConnection)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=10)
        request = completion_request("tinyllm", "int4", "Hi", 5)
        first = stream_completion(conn, request, expect_precision="int4")
        time.sleep(0.2)  # the server has closed its side by now
        second = stream_completion(conn, request, expect_precision="int4")
        assert first.ok and second.ok, (first.error, second.error)
        assert second.completion_tokens == 5 and second.served == "int4"
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
