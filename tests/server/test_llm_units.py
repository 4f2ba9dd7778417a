"""The LLM serving pieces that need no model run: the catalog's declared kind, Triton generate
bodies, the OpenAI error mapping, and that a repository without an LLM never imports
onnxruntime-genai."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.llm import ContextLengthError, LlmError, LlmRequestError
from common.model_repository import read_config, write_config
from server.catalog import LLM, TENSOR, load_repository
from server.errors import ConfigError, ModelNotFound, Unavailable, from_llm_error
from server.transports.http.generate import parse_generate
from server.transports.http.openai import error_response
from tests.server.llm_repo import write_llm_repository


def _genai_folder(tmp_path: Path) -> Path:
    """A stand-in genai folder (the catalog only checks that it is there)."""
    folder = tmp_path / "genai-src"
    folder.mkdir(parents=True)
    (folder / "genai_config.json").write_text("{}")
    return folder


def test_catalog_declares_llm_variants(tmp_path: Path, tiny_repository: Path) -> None:
    repo = write_llm_repository(tmp_path / "repo", "tinyllm", {"int4": _genai_folder(tmp_path)})
    model = load_repository(repo).models["tinyllm"]
    variant = model.variants["int4"]
    assert (model.kind, variant.kind, variant.decoupled) == (LLM, LLM, True)
    assert variant.problem is None and variant.path.is_dir()
    assert variant.openai_name == "tinyllm:int4"
    tiny = load_repository(tiny_repository)
    assert {v.kind for v in tiny.variants()} == {TENSOR}
    assert not tiny.has_llm()


def test_an_llm_variant_must_be_decoupled_and_have_its_folder(tmp_path: Path) -> None:
    repo = write_llm_repository(tmp_path / "repo", "tinyllm", {"fp32": _genai_folder(tmp_path)})
    cfg = read_config(repo / "tinyllm_fp32")
    cfg.model_transaction_policy.decoupled = False
    write_config(repo / "tinyllm_fp32", cfg)
    assert "decoupled: true" in load_repository(repo).variant("tinyllm_fp32").problem
    cfg.model_transaction_policy.decoupled = True
    write_config(repo / "tinyllm_fp32", cfg)
    (repo / "tinyllm_fp32" / "1" / "genai" / "genai_config.json").unlink()
    (repo / "tinyllm_fp32" / "1" / "genai").rmdir()
    assert "folder" in load_repository(repo).variant("tinyllm_fp32").problem


def test_one_model_cannot_mix_llm_and_tensor_variants(tmp_path: Path) -> None:
    repo = write_llm_repository(
        tmp_path / "repo", "tinyllm", {p: _genai_folder(tmp_path / p) for p in ("fp32", "int4")}
    )
    manifest = json.loads((repo / "tinyllm.manifest.json").read_text())
    manifest["variants"]["int4"]["engine"] = "onnxruntime"
    (repo / "tinyllm.manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="mixes variant kinds"):
        load_repository(repo)


def test_generate_body_sampling_tensor_wins_and_other_keys_are_parameters() -> None:
    text, sampling, params, exclude = parse_generate(
        {
            "text_input": "Hi",
            "sampling_parameters": json.dumps({"max_tokens": 9, "temperature": 0}),
            "parameters": {"temperature": 0.5, "top_p": 0.5, "precision": "int4"},
            "stop": ["\n"],
            "exclude_input_in_output": False,
        }
    )
    assert (text, sampling.max_tokens, sampling.temperature, sampling.top_p) == ("Hi", 9, 0, 0.5)
    assert sampling.stop == ("\n",)
    assert params["precision"] == "int4" and exclude is False


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({}, "text_input"),
        ({"text_input": "x", "sampling_parameters": "{bad"}, None),
        ({"text_input": "x", "parameters": {"top_p": 0}}, "top_p"),
    ],
)
def test_generate_body_errors_name_the_field(doc: dict, field: str | None) -> None:
    from server.errors import InvalidGeneration

    with pytest.raises(InvalidGeneration) as e:
        parse_generate(doc)
    assert e.value.param == field


def test_openai_error_mapping() -> None:
    def shape(error: BaseException) -> tuple[int, dict]:
        response = error_response(error, "m")
        return response.status, json.loads(response.body)["error"]

    status, body = shape(from_llm_error(ContextLengthError("too long", "max_tokens")))
    assert (status, body["code"], body["param"]) == (400, "context_length_exceeded", "max_tokens")
    status, body = shape(from_llm_error(LlmRequestError("bad", "top_p")))
    assert (status, body["code"], body["param"], body["type"]) == (
        400,
        None,
        "top_p",
        "invalid_request_error",
    )
    assert shape(ModelNotFound("x"))[1]["code"] == "model_not_found"
    status, body = shape(Unavailable("queue full for m_int4"))
    assert (status, body["type"], body["code"]) == (503, "server_error", "server_overloaded")
    assert shape(from_llm_error(LlmError("engine broke")))[0] == 500
    assert shape(RuntimeError("bug"))[0] == 500


def test_no_llm_no_onnxruntime_genai_import(tiny_repository: Path) -> None:
    """The gateway assembled and started on a repository without an LLM (the usual case) does
    not import onnxruntime-genai."""
    code = (
        "import asyncio, sys\n"
        "from server.catalog import load_repository\n"
        "from server.upstreams.base import create_upstream\n"
        "import server.transports.http.app, server.transports.grpc.service\n"
        f"repo = load_repository({str(tiny_repository)!r})\n"
        "up = create_upstream('embedded', repo)\n"
        "asyncio.run(up.start())\n"
        "print('onnxruntime_genai' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "False"
