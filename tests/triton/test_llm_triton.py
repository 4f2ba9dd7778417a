"""A real tritonserver (nvidia-pytriton wheel) serving the tiny LLM's built variants
(common/llm/triton_model.py, python backend, decoupled): tritonclient's gRPC stream
(ModelStreamInfer) and the HTTP generate extension."""

from __future__ import annotations

import json
import queue
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from common.llm import triton_model
from common.model_repository import load_manifest, manifest_path
from server.launcher.derive import derive_repository
from tests.triton.conftest import StartTriton

pytestmark = pytest.mark.integration

PROMPT = "Once upon a time"


def _inputs(prompt: str, stream: bool, sampling: dict[str, Any]) -> list[grpcclient.InferInput]:
    out = []
    for name, datatype, value in (
        ("text_input", "BYTES", np.array([prompt.encode()], dtype=np.object_)),
        ("stream", "BOOL", np.array([stream])),
        ("sampling_parameters", "BYTES", np.array([json.dumps(sampling).encode()], np.object_)),
    ):
        tensor = grpcclient.InferInput(name, [1], datatype)
        tensor.set_data_from_numpy(value)
        out.append(tensor)
    return out


def _stream(server_url: str, model: str, sampling: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(text, finish_reason, final) of every response of one streamed request."""
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(
            model, _inputs(PROMPT, True, sampling), enable_empty_final_response=True
        )
        got = []
        while True:
            result, error = responses.get(timeout=60)
            assert error is None, error
            response = result.get_response()
            final = response.parameters["triton_final_response"].bool_param
            if response.outputs:
                text = result.as_numpy("text_output")[0].decode()
                reason = result.as_numpy("finish_reason")[0].decode()
                got.append((text, reason, final))
            else:
                got.append(("", "", final))
            if final:
                return got
    finally:
        client.stop_stream()
        client.close()


def _generate(http_url: str, model: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://{http_url}/v2/models/{model}/generate",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_triton_streams_the_int4_variant_and_answers_generate(
    tiny_llm_repository: Path, start_triton: StartTriton
) -> None:
    server = start_triton(tiny_llm_repository)
    sampling = {"max_tokens": 6, "temperature": 0}
    streamed = _stream(server.grpc_url, "tinyllm_int4", sampling)
    assert len(streamed) >= 2, streamed  # decoupled: several responses
    assert [final for _, _, final in streamed] == [False] * (len(streamed) - 1) + [True]
    assert all(reason == "" for _, reason, _ in streamed[:-1])
    assert streamed[-1][1] == "length"
    text = "".join(t for t, _, _ in streamed)
    # the generate extension: sampling fields as request parameters, one response
    status, body = _generate(
        server.http_url, "tinyllm_int4", {"text_input": PROMPT, "max_tokens": 6, "temperature": 0}
    )
    assert status == 200, body
    assert body["text_output"] == text  # greedy: the same tokens streamed or not
    assert body["finish_reason"] == "length" and body["num_output_tokens"] == 6
    assert body["num_input_tokens"] >= 1
    # a prompt over the context length is the client's error, and the model keeps serving
    status, body = _generate(
        server.http_url, "tinyllm_fp32", {"text_input": PROMPT, "max_tokens": 1000}
    )
    assert status == 400 and "maximum context length" in body["error"], body
    status, body = _generate(
        server.http_url, "tinyllm_fp32", {"text_input": PROMPT, "max_tokens": 2, "temperature": 0}
    )
    assert status == 200 and body["num_output_tokens"] == 2


def test_a_cancelled_stream_stops_generating_and_the_model_keeps_serving(
    tiny_llm_repository: Path, start_triton: StartTriton
) -> None:
    server = start_triton(tiny_llm_repository)
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    sampling = {"max_tokens": 200, "temperature": 0}
    client.async_stream_infer("tinyllm_fp32", _inputs(PROMPT, True, sampling))
    for _ in range(3):
        assert responses.get(timeout=60)[1] is None
    client.stop_stream(cancel_requests=True)
    client.close()
    assert server.log_file is not None
    pattern = re.compile(r"'tinyllm_fp32': request cancelled by the client after (\d+) tokens")
    deadline = time.monotonic() + 30
    found = None
    while found is None and time.monotonic() < deadline:
        found = pattern.search(server.log_file.read_text(errors="replace"))
        time.sleep(0.2)
    assert found is not None, "the model did not see the cancellation"
    assert 3 <= int(found.group(1)) < 200
    status, body = _generate(
        server.http_url, "tinyllm_fp32", {"text_input": PROMPT, "max_tokens": 2, "temperature": 0}
    )
    assert status == 200 and body["num_output_tokens"] == 2


def test_derived_llm_config_points_at_the_genai_folder(
    tiny_llm_repository: Path, tmp_path: Path
) -> None:
    models = derive_repository(tiny_llm_repository, tmp_path / "derived", threads=2)
    manifest = load_manifest(manifest_path(tiny_llm_repository, "tinyllm"))
    assert sorted(m.name for m in models) == sorted(
        v.triton_name for v in manifest.variants.values()
    )
    from common.model_repository import read_config

    for record in manifest.variants.values():
        cfg = read_config(tmp_path / "derived" / record.triton_name)
        assert cfg.model_transaction_policy.decoupled and cfg.backend == "python"
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        assert params[triton_model.PARAM_GENAI_FOLDER] == str(
            (tiny_llm_repository / record.file).resolve()
        )
        assert params[triton_model.PARAM_THREADS] == "2"
        model_py = tmp_path / "derived" / record.triton_name / "1" / "model.py"
        assert model_py.read_bytes() == Path(triton_model.__file__).read_bytes()
