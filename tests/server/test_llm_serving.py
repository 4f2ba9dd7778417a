"""Serving decoder LLM variants (docs/llm-serving.md): the OpenAI-compatible API with the
official SDK, Triton's generate extension over HTTP, ModelStreamInfer of a decoupled model with
tritonclient's streaming client, routing by precision, errors, limits and client disconnects.

One gateway process per module on the tiny random Llama as ``precision-build`` builds it
(``tiny_llm_repository``: fp32, int8, int4; its text is gibberish: the tests check mechanics,
and that greedy decoding gives the same text whichever API asks)."""

from __future__ import annotations

import asyncio
import json
import queue
import socket
import time
from pathlib import Path

import numpy as np
import openai
import pytest
import requests
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from server.runtime.runner import GatewayProcess

pytestmark = pytest.mark.integration

PRECISIONS = ["fp32", "int8", "int4"]
MESSAGES = [{"role": "user", "content": "Say something."}]
SEQUENCES, QUEUE, MAX_TOKENS = 1, 1, 200
TOKENS = "max_tokens"


@pytest.fixture(scope="module")
def llm_gateway(tiny_llm_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    routing = tmp_path_factory.mktemp("llm_routing") / "routing.yaml"
    routing.write_text("models:\n  tinyllm:\n    policy: fixed\n    precision: int4\n")
    upstream = f"embedded?threads=1&sequences={SEQUENCES}&queue={QUEUE}&max_tokens={MAX_TOKENS}"
    args = ["--upstream", upstream, "--routing", str(routing)]
    with GatewayProcess(tiny_llm_repository, args) as gw:
        yield gw


@pytest.fixture
def client(llm_gateway) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://{llm_gateway.http_url}/v1", api_key="unused", max_retries=0
    )


def metric(gw, name: str, **labels: str) -> float:
    """A sample's value on the gateway's /metrics (0 when absent)."""
    text = requests.get(gw.metrics_url, timeout=10).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


# ---- the official OpenAI SDK, unchanged ------------------------------------------------------
@pytest.mark.parametrize("precision", PRECISIONS)
def test_openai_sdk_completions_stream_and_not(client: openai.OpenAI, precision: str) -> None:
    model = f"tinyllm:{precision}"
    whole = client.completions.create(model=model, prompt="Once", max_tokens=8, temperature=0)
    assert whole.model == model
    assert whole.object == "text_completion"
    choice = whole.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens == 8 if choice.finish_reason == "length" else True
    assert whole.usage.prompt_tokens >= 1
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = client.completions.create(
        model=model,
        prompt="Once",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    events = list(stream)
    assert all(e.model == model for e in events)
    text = "".join(c.text for e in events for c in e.choices)
    assert text == choice.text  # greedy: the same text streamed or not
    finishes = [c.finish_reason for e in events for c in e.choices if c.finish_reason]
    assert finishes == [choice.finish_reason]
    assert events[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("precision", PRECISIONS)
def test_openai_sdk_chat_stream_and_not(client: openai.OpenAI, precision: str) -> None:
    model = f"tinyllm:{precision}"
    whole = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, temperature=0
    )
    assert whole.model == model
    message = whole.choices[0].message
    assert message.role == "assistant"
    # the model's chat template made the prompt: far more tokens than the message's words
    assert whole.usage.prompt_tokens > 10
    stream = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, temperature=0, stream=True
    )
    events = list(stream)
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(e.choices[0].delta.content or "" for e in events)
    assert text == message.content
    assert events[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_models_lists_logical_and_precision_names(client: openai.OpenAI) -> None:
    names = ["tinyllm", "tinyllm:fp32", "tinyllm:int8", "tinyllm:int4"]
    assert [m.id for m in client.models.list()] == names
    assert client.models.retrieve("tinyllm:int4").id == "tinyllm:int4"


def test_precision_by_name_header_and_policy(client: openai.OpenAI) -> None:
    def served(model: str, **headers: str) -> tuple[str, str]:
        raw = client.completions.with_raw_response.create(
            model=model, prompt="Hi", max_tokens=2, extra_headers=headers or None
        )
        return raw.parse().model, raw.headers["x-precision"]

    assert served("tinyllm") == ("tinyllm:int4", "int4")  # the routing file's fixed policy
    assert served("tinyllm", **{"x-precision": "fp32"}) == ("tinyllm:fp32", "fp32")
    assert served("tinyllm_fp32") == ("tinyllm:fp32", "fp32")
    assert served("tinyllm:fp32", **{"x-precision": "int4"}) == ("tinyllm:fp32", "fp32")


# ---- errors in OpenAI's shape, and nothing else disturbed -------------------------------------
@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        ({"model": "nope", "prompt": "x"}, 404, "model_not_found", "model"),
        ({"model": "tinyllm:fp16", "prompt": "x"}, 404, "model_not_found", "model"),
        ({"model": "tinyllm", "prompt": "x " * 300}, 400, "context_length_exceeded", "max_tokens"),
        ({"model": "tinyllm", "prompt": "x", "max_tokens": MAX_TOKENS + 1}, 400, None, TOKENS),
        ({"model": "tinyllm", "prompt": "x", "temperature": 5}, 400, None, "temperature"),
        ({"model": "tinyllm", "prompt": 3}, 400, None, "prompt"),
    ],
)
def test_openai_errors(llm_gateway, client, body, status, code, param) -> None:
    r = requests.post(f"http://{llm_gateway.http_url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["code"], error["param"]) == (code, param)
    assert error["message"]
    assert client.completions.create(model="tinyllm", prompt="Hi", max_tokens=2).choices


def test_openai_sdk_raises_on_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="missing", messages=MESSAGES)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tinyllm", messages=[{"role": "user", "content": "x " * 300}]
        )
    assert e.value.code == "context_length_exceeded"
    assert "maximum context length is 256 tokens" in e.value.message


def test_malformed_json_is_400(llm_gateway, client) -> None:
    url = f"http://{llm_gateway.http_url}/v1/chat/completions"
    r = requests.post(url, data=b"{not json", timeout=30)
    assert r.status_code == 400
    assert "could not parse the JSON body" in r.json()["error"]["message"]
    assert client.chat.completions.create(model="tinyllm", messages=MESSAGES, max_tokens=2)


def test_queue_full_is_503_and_the_others_finish(llm_gateway) -> None:
    """sequences=1, queue=1: of six long requests at once, one generates, one waits and the
    rest are refused at once with 503 in OpenAI's shape; the admitted ones complete."""
    aclient = openai.AsyncOpenAI(
        base_url=f"http://{llm_gateway.http_url}/v1", api_key="unused", max_retries=0
    )

    async def one() -> object:
        try:
            return await aclient.completions.create(
                model="tinyllm", prompt="Go", max_tokens=MAX_TOKENS, temperature=0
            )
        except openai.APIStatusError as e:
            return e

    async def burst() -> list[object]:
        return await asyncio.gather(*(one() for _ in range(6)))

    before = metric(llm_gateway, "precision_serve_queue_rejections_total", precision="int4")
    results = asyncio.run(burst())
    refused = [r for r in results if isinstance(r, openai.APIStatusError)]
    served = [r for r in results if not isinstance(r, openai.APIStatusError)]
    assert refused and served
    assert len(served) <= SEQUENCES + QUEUE + 1  # +1: one may finish before the last arrives
    for e in refused:
        assert e.status_code == 503
        assert e.body["code"] == "server_overloaded"
        assert "queue full for tinyllm_int4" in e.body["message"]
    after = metric(llm_gateway, "precision_serve_queue_rejections_total", precision="int4")
    assert after - before == len(refused)


def _leave(gw, path: str, body: dict, wait_for_data: bool) -> None:
    """POST ``body`` on a raw connection and close it: after the first event (a stream), or
    once the generation holds its sequence slot (an answer that comes at the end)."""
    data = json.dumps(body).encode()
    host, port = gw.http_url.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
            + f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data
        )
        seen = b""
        while wait_for_data and b"data: " not in seen:
            seen += sock.recv(4096)
        deadline = time.monotonic() + 20
        active = "precision_serve_llm_active_sequences"
        while not wait_for_data and metric(gw, active, precision="fp32") < 1:
            assert time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.005)


@pytest.mark.parametrize(
    ("path", "stream"),
    [
        ("/v1/completions", True),
        ("/v1/completions", False),
        ("/v2/models/tinyllm_fp32/generate", False),
    ],
)
def test_client_disconnect_stops_generation(llm_gateway, path: str, stream: bool) -> None:
    labels = {"model": "tinyllm", "precision": "fp32"}
    cancelled = "precision_serve_llm_requests_finished_total"
    before = metric(llm_gateway, cancelled, **labels, finish_reason="cancelled")
    tokens_before = metric(llm_gateway, "precision_serve_llm_output_tokens_sum", **labels)
    if path.startswith("/v1/"):
        body = {"model": "tinyllm:fp32", "prompt": "Go", "max_tokens": MAX_TOKENS, "stream": stream}
    else:
        body = {"text_input": "Go", "max_tokens": MAX_TOKENS}
    _leave(llm_gateway, path, body, wait_for_data=stream)
    deadline = time.monotonic() + 20
    while metric(llm_gateway, cancelled, **labels, finish_reason="cancelled") == before:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    assert metric(llm_gateway, "precision_serve_llm_active_sequences", **labels) == 0
    generated = metric(llm_gateway, "precision_serve_llm_output_tokens_sum", **labels)
    assert generated - tokens_before < MAX_TOKENS  # stopped before max_tokens


# ---- Triton's generate extension over HTTP ----------------------------------------------------
def test_generate_and_generate_stream(llm_gateway, client: openai.OpenAI) -> None:
    base = f"http://{llm_gateway.http_url}/v2/models"
    body = {"text_input": "Once", "parameters": {"max_tokens": 6, "temperature": 0}}
    r = requests.post(f"{base}/tinyllm_fp32/generate", json=body, timeout=30)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert (doc["model_name"], doc["model_version"]) == ("tinyllm_fp32", "1")
    assert r.headers["x-precision"] == "fp32"
    same = client.completions.create(
        model="tinyllm:fp32", prompt="Once", max_tokens=6, temperature=0
    )
    assert doc["text_output"] == same.choices[0].text
    assert doc["finish_reason"] == same.choices[0].finish_reason
    assert doc["num_output_tokens"] == same.usage.completion_tokens

    # top-level keys that are not inputs are parameters too (Triton's generate extension)
    r = requests.post(
        f"{base}/tinyllm/versions/1/generate_stream",
        json={"text_input": "Once", "max_tokens": 6, "temperature": 0, "precision": "fp32"},
        stream=True,
        timeout=30,
    )
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith(b"data: ")]
    assert "".join(e["text_output"] for e in events) == doc["text_output"]
    assert [e["finish_reason"] for e in events][-1] == doc["finish_reason"]
    assert all(e["model_name"] == "tinyllm_fp32" for e in events)

    r = requests.post(f"{base}/tinyllm/generate", json={"parameters": {}}, timeout=30)
    assert r.status_code == 400
    assert "text_input" in r.json()["error"]
    r = requests.post(f"{base}/tinyllm/infer", json={"inputs": []}, timeout=30)
    assert r.status_code == 501
    assert "decoupled transaction policy" in r.json()["error"]


# ---- ModelStreamInfer of a decoupled model, with tritonclient's streaming client --------------
def _inputs(text: str, stream: bool, **sampling: object) -> list[grpcclient.InferInput]:
    t = grpcclient.InferInput("text_input", [1], "BYTES")
    t.set_data_from_numpy(np.array([text.encode()], dtype=object))
    s = grpcclient.InferInput("stream", [1], "BOOL")
    s.set_data_from_numpy(np.array([stream]))
    p = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    p.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=object))
    return [t, s, p]


def test_tritonclient_grpc_stream_of_a_decoupled_model(llm_gateway, client) -> None:
    got: queue.Queue = queue.Queue()
    triton = grpcclient.InferenceServerClient(llm_gateway.grpc_url)
    triton.start_stream(callback=lambda result, error: got.put((result, error)))
    try:

        def responses(request_id: str) -> list:
            out = []
            while True:
                result, error = got.get(timeout=60)
                assert error is None, error
                response = result.get_response()
                assert response.id == request_id
                out.append(result)
                if response.parameters["triton_final_response"].bool_param:
                    return out

        inputs = _inputs("Once", True, max_tokens=6, temperature=0)
        triton.async_stream_infer(
            "tinyllm",
            inputs,
            request_id="s1",
            parameters={"precision": "fp32"},
            enable_empty_final_response=True,
        )
        pieces = responses("s1")  # the last flagged final, with the last text and the reason
        assert len(pieces) >= 2
        for r in pieces:
            assert r.get_response().model_name == "tinyllm_fp32"
            assert r.get_response().parameters["precision"].string_param == "fp32"
        text = b"".join(r.as_numpy("text_output")[0] for r in pieces).decode()
        finishes = [r.as_numpy("finish_reason")[0].decode() for r in pieces]
        same = client.completions.create(
            model="tinyllm:fp32", prompt="Once", max_tokens=6, temperature=0
        )
        assert text == same.choices[0].text
        assert finishes[-1] == same.choices[0].finish_reason and not any(finishes[:-1])
        assert sum(int(r.as_numpy("num_output_tokens")[0]) for r in pieces) == 6

        # not streamed: one response with everything, flagged final
        inputs = _inputs("Once", False, max_tokens=6, temperature=0)
        triton.async_stream_infer(
            "tinyllm_fp32", inputs, request_id="s2", enable_empty_final_response=True
        )
        whole = responses("s2")
        assert len(whole) == 1
        assert whole[0].as_numpy("text_output")[0].decode() == text

        # an error is an in-stream error; the stream goes on
        triton.async_stream_infer("tinyllm", _inputs("x " * 300, True), request_id="s3")
        _, error = got.get(timeout=60)
        assert isinstance(error, InferenceServerException)
        assert "maximum context length" in error.message()
        triton.async_stream_infer(
            "tinyllm", inputs, request_id="s4", enable_empty_final_response=True
        )
        assert responses("s4")[0].get_response().model_name == "tinyllm_int4"
    finally:
        triton.stop_stream()
    with pytest.raises(InferenceServerException) as e:
        triton.infer("tinyllm", _inputs("Hi", False))
    assert e.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "ModelInfer RPC doesn't support models with decoupled" in e.value.message()


# ---- a Triton upstream: here the module's gateway stands in for the Triton replica ------------
def test_triton_upstream_forwards_generation(llm_gateway, tiny_llm_repository, client) -> None:
    """A second gateway with ``--upstream triton://<first gateway>``: generation goes over
    ModelStreamInfer of the decoupled model (server/upstreams/triton/generation.py) and gives
    the text, usage and errors the embedded upstream gives. The replica is a gateway, not
    tritonserver (the builder's python-backend model on Triton is not covered here)."""
    spec = f"triton://{llm_gateway.grpc_url}?cancel=propagate"
    with GatewayProcess(tiny_llm_repository, ["--upstream", spec]) as front:
        via = openai.OpenAI(base_url=f"http://{front.http_url}/v1", api_key="x", max_retries=0)
        for model in ("tinyllm:int4", "tinyllm_fp32"):
            direct = client.completions.create(
                model=model, prompt="Once", max_tokens=6, temperature=0
            )
            got = via.completions.create(model=model, prompt="Once", max_tokens=6, temperature=0)
            assert got.model == direct.model
            assert got.choices[0].text == direct.choices[0].text
            assert got.usage == direct.usage
            events = via.completions.create(
                model=model, prompt="Once", max_tokens=6, temperature=0, stream=True
            )
            assert "".join(e.choices[0].text for e in events) == direct.choices[0].text
        with pytest.raises(openai.BadRequestError) as e:
            via.completions.create(model="tinyllm", prompt="x " * 300, max_tokens=5)
        assert e.value.code == "context_length_exceeded"
