"""The shared repository schema (server/model_repository): manifests validate on load, name the
bad field, and refuse files of another schema_version with the way out."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common.model_repository import (
    LLM_TASK,
    SCHEMA_VERSION,
    LlmModelRecord,
    LlmSpeed,
    LlmVariantRecord,
    Manifest,
    ManifestError,
    SchemaVersionError,
    TensorSpec,
    VariantRecord,
    load_manifest,
    load_manifests,
    manifest_path,
    variant_name,
)


def _manifest() -> Manifest:
    m = Manifest(
        model="tiny",
        source="onnx:tiny.onnx",
        task="classification",
        inputs=[TensorSpec("x", "float32", [16])],
        outputs=[TensorSpec("logits", "float32", [4])],
        max_batch_size=8,
    )
    m.variants["int8"] = VariantRecord(
        precision="int8", triton_name=variant_name("tiny", "int8"), file="tiny_int8/1/model.onnx"
    )
    return m


def _write(tmp_path: Path, data: dict) -> Path:
    path = manifest_path(tmp_path, "tiny")
    path.write_text(json.dumps(data))
    return path


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    m = _manifest()
    m.variants["int8"].details["accuracy_loss"] = 0.25
    m.save(tmp_path)
    back = load_manifest(manifest_path(tmp_path, "tiny"))
    assert back == m
    assert back.variants["int8"].triton_name == "tiny_int8"
    assert back.variants["int8"].accuracy_loss == 0.25
    assert json.loads(manifest_path(tmp_path, "tiny").read_text())["schema_version"] == 1


@pytest.mark.parametrize(
    ("version", "words"),
    [
        (SCHEMA_VERSION + 1, "newer than this precision-serve reads"),
        (SCHEMA_VERSION - 1, "older than this precision-serve reads"),
        (None, "no valid schema_version"),
        ("1", "no valid schema_version"),
    ],
)
def test_other_schema_versions_are_refused_with_the_way_out(
    tmp_path: Path, version: object, words: str
) -> None:
    data = _manifest().to_dict()
    if version is None:
        del data["schema_version"]
    else:
        data["schema_version"] = version
    path = _write(tmp_path, data)
    with pytest.raises(SchemaVersionError, match=words) as info:
        load_manifest(path)
    assert str(path) in str(info.value)


def test_unknown_and_mistyped_fields_are_named(tmp_path: Path) -> None:
    data = _manifest().to_dict()
    data["variants"]["int8"]["size_byte"] = 12  # misspelt
    with pytest.raises(ManifestError, match=r"variants\.int8\.size_byte"):
        load_manifest(_write(tmp_path, data))
    data = _manifest().to_dict()
    data["max_batch_size"] = "many"
    with pytest.raises(ManifestError, match=r"max_batch_size"):
        load_manifest(_write(tmp_path, data))


def _llm_manifest() -> Manifest:
    m = Manifest(
        model="tinyllm",
        source="hf:tinyllm",
        task=LLM_TASK,
        inputs=[TensorSpec("text_input", "object", [1])],
        outputs=[TensorSpec("text_output", "object", [1])],
        max_batch_size=0,
        llm=LlmModelRecord(
            architecture="LlamaForCausalLM", context_length=256, eval_text="own text"
        ),
    )
    m.variants["int4"] = VariantRecord(
        precision="int4",
        triton_name="tinyllm_int4",
        file="tinyllm_int4/1/genai",
        engine="onnxruntime-genai",
        llm=LlmVariantRecord(
            ppl=12.5,
            ppl_ratio=1.2,
            kl_mean=0.3,
            top1_agreement=0.8,
            speed=[LlmSpeed(threads=1, ttft_ms=600.0, itl_ms=12.5, decode_tok_s=80.0)],
        ),
    )
    return m


def test_llm_records_round_trip_and_old_manifests_still_load(tmp_path: Path) -> None:
    m = _llm_manifest()
    m.save(tmp_path)
    back = load_manifest(manifest_path(tmp_path, "tinyllm"))
    assert back == m and back.is_llm
    assert back.variants["int4"].llm is not None
    speed = back.variants["int4"].llm.speed_at(1)
    assert speed is not None and speed.decode_tok_s == 80.0
    assert back.variants["int4"].llm.speed_at(2) is None
    # a manifest written before the llm records existed: no "llm" keys at all
    old = _manifest().to_dict()
    del old["llm"]
    for v in old["variants"].values():
        del v["llm"]
    loaded = load_manifest(_write(tmp_path, old))
    assert loaded.llm is None and loaded.variants["int8"].llm is None and not loaded.is_llm


def test_mistyped_llm_fields_are_named(tmp_path: Path) -> None:
    data = _llm_manifest().to_dict()
    data["variants"]["int4"]["llm"]["kl_mean"] = "small"
    with pytest.raises(ManifestError, match=r"variants\.int4\.llm\.kl_mean"):
        load_manifest(_write(tmp_path, data))
    data = _llm_manifest().to_dict()
    data["llm"]["window"] = 5  # not a field
    with pytest.raises(ManifestError, match=r"llm\.window"):
        load_manifest(_write(tmp_path, data))


def test_unreadable_manifest_is_a_manifest_error(tmp_path: Path) -> None:
    manifest_path(tmp_path, "tiny").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        load_manifests(tmp_path)


def test_gateway_cli_reports_a_newer_manifest_in_one_line(tiny_repository: Path, tmp_path: Path):
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(tiny_repository, repo)
    path = manifest_path(repo, "tiny")
    data = json.loads(path.read_text())
    data["schema_version"] = SCHEMA_VERSION + 1
    path.write_text(json.dumps(data))
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "--repository", str(repo), "--ports", "0"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "newer than this precision-serve reads" in lines[0] and "upgrade" in lines[0]
