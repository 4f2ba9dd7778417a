"""The gateway in front of a real tritonserver serving the tiny LLM's python-backend variants
(``--upstream triton://…``, server/upstreams/triton/generation.py): the OpenAI API and the
generate extension through the gateway give Triton's own text, usage and errors."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import openai
import pytest

from common.llm import GenaiModel
from server.runtime.runner import GatewayProcess
from tests.triton.conftest import StartTriton

pytestmark = pytest.mark.integration


def _triton_generate(http_url: str, model: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://{http_url}/v2/models/{model}/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        return json.loads(r.read())


def test_gateway_streams_llm_text_from_triton(
    tiny_llm_repository: Path, start_triton: StartTriton
) -> None:
    server = start_triton(tiny_llm_repository)
    own = _triton_generate(
        server.http_url, "tinyllm_int4", {"text_input": "Once", "max_tokens": 6, "temperature": 0}
    )
    spec = f"triton://{server.grpc_url}"
    with GatewayProcess(tiny_llm_repository, ["--upstream", spec]) as gw:
        client = openai.OpenAI(base_url=f"http://{gw.http_url}/v1", api_key="x", max_retries=0)
        whole = client.completions.create(
            model="tinyllm:int4", prompt="Once", max_tokens=6, temperature=0
        )
        assert whole.model == "tinyllm:int4"
        assert whole.choices[0].text == own["text_output"]
        assert whole.choices[0].finish_reason == own["finish_reason"] == "length"
        assert whole.usage.prompt_tokens == own["num_input_tokens"]
        assert whole.usage.completion_tokens == 6
        events = client.completions.create(
            model="tinyllm:int4", prompt="Once", max_tokens=6, temperature=0, stream=True
        )
        assert "".join(e.choices[0].text for e in events) == own["text_output"]
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tinyllm:int4", prompt="Once", max_tokens=1000)
        assert e.value.code == "context_length_exceeded"
        # the gateway and Triton keep serving
        again = client.completions.create(model="tinyllm", prompt="Once", max_tokens=2)
        assert again.usage.completion_tokens == 2
        # chat: the messages go to the model, which renders its own chat template
        messages = [{"role": "user", "content": "Hi there"}]
        rendered = GenaiModel(tiny_llm_repository / "tinyllm_int4" / "1" / "genai")
        prompt = rendered.chat_prompt(messages)
        own_chat = _triton_generate(
            server.http_url,
            "tinyllm_int4",
            {"text_input": prompt, "max_tokens": 6, "temperature": 0},
        )
        chat = client.chat.completions.create(
            model="tinyllm:int4",
            messages=messages,
            max_tokens=6,
            temperature=0,  # type: ignore[arg-type]
        )
        assert chat.choices[0].message.content == own_chat["text_output"]
        assert chat.usage is not None
        assert chat.usage.prompt_tokens == own_chat["num_input_tokens"]
        streamed = client.chat.completions.create(
            model="tinyllm:int4",
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,  # type: ignore[arg-type]
        )
        text = "".join(e.choices[0].delta.content or "" for e in streamed if e.choices)
        assert text == own_chat["text_output"]
        # no max_tokens: up to what fits the context, decided where the model is
        fit = client.chat.completions.create(
            model="tinyllm:int4",
            messages=messages,
            temperature=0,  # type: ignore[arg-type]
        )
        assert fit.usage is not None
        assert fit.usage.completion_tokens > 16  # not the completions default
        assert fit.usage.prompt_tokens + fit.usage.completion_tokens <= rendered.context_length
