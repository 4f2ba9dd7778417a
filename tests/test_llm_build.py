"""The decoder-LLM build (builder/llm/) on the tiny random Llama (tests/llm.py): the Triton layout,
the manifest's llm records, quality figures, the table, the budgets and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from builder import cli
from builder.llm import pipeline as llm_pipeline
from builder.options import BuildOptions
from common.llm import GenaiModel, SamplingParams, stream_text, triton_model
from common.model_repository import (
    LLM_TASK,
    Manifest,
    load_manifest,
    manifest_path,
    read_config,
)

PRECISIONS = ("fp32", "int8", "int4")


@pytest.fixture(scope="module")
def manifest(tiny_llm_repository: Path) -> Manifest:
    return load_manifest(manifest_path(tiny_llm_repository, "tinyllm"))


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("precision-build: error:")
    return lines[0]


def test_each_precision_is_a_decoupled_python_model_with_its_genai_folder(
    tiny_llm_repository: Path, manifest: Manifest
) -> None:
    assert manifest.task == LLM_TASK and manifest.max_batch_size == 0
    assert list(manifest.variants) == list(PRECISIONS)
    model_py = Path(triton_model.__file__).read_bytes()
    for precision, record in manifest.variants.items():
        folder = tiny_llm_repository / f"tinyllm_{precision}"
        cfg = read_config(folder)  # parsed back as a model_config_pb2.ModelConfig
        assert cfg.name == record.triton_name == f"tinyllm_{precision}"
        assert cfg.backend == "python" and not cfg.platform and cfg.max_batch_size == 0
        assert cfg.model_transaction_policy.decoupled
        assert [i.name for i in cfg.input] == [n for n, _, _ in triton_model.INPUTS]
        assert [i.optional for i in cfg.input] == [o for _, _, o in triton_model.INPUTS]
        assert [o.name for o in cfg.output] == [n for n, _ in triton_model.OUTPUTS]
        assert (folder / "1" / "model.py").read_bytes() == model_py
        assert record.file == f"tinyllm_{precision}/1/genai"
        assert (tiny_llm_repository / record.file / "genai_config.json").is_file()
        assert record.engine == "onnxruntime-genai"
        assert record.llm is not None and record.llm.genai_precision == precision
    assert [t.name for t in manifest.inputs] == [n for n, _, _ in triton_model.INPUTS]
    assert manifest.llm is not None and manifest.llm.architecture == "LlamaForCausalLM"
    assert manifest.llm.context_length == 256 and manifest.llm.prompt_tokens == 128
    assert "eval_text.txt" in manifest.llm.eval_text


def test_built_variant_streams_text(tiny_llm_repository: Path, manifest: Manifest) -> None:
    model = GenaiModel(tiny_llm_repository / manifest.variants["int4"].file, threads=1)
    chunks = list(stream_text(model, model.encode("Hello"), SamplingParams(max_tokens=5)))
    assert sum(c.tokens for c in chunks) == 5 and chunks[-1].finish_reason == "length"


def test_quality_figures_are_finite_and_ordered(manifest: Manifest) -> None:
    llm = {p: v.llm for p, v in manifest.variants.items()}
    assert all(r is not None for r in llm.values())
    fp32, int8, int4 = llm["fp32"], llm["int8"], llm["int4"]
    assert fp32 and int8 and int4
    for r in (fp32, int8, int4):
        assert math.isfinite(r.ppl) and r.ppl > 1 and r.eval_tokens >= 200
        assert 0.0 <= r.top1_agreement <= 1.0
    assert fp32.kl_mean == 0.0 and fp32.ppl_ratio == 1.0 and fp32.top1_agreement == 1.0
    # 4-bit weights move the next-token distributions more than 8-bit ones
    assert int4.kl_mean > int8.kl_mean > 0.0
    assert int4.top1_agreement <= int8.top1_agreement
    sizes = {p: v.size_bytes for p, v in manifest.variants.items()}
    assert sizes["int4"] < 0.5 * sizes["fp32"]
    loss = manifest.variants["int4"].details["accuracy_loss"]
    assert loss == pytest.approx(max(0.0, 100 * (int4.ppl_ratio - 1)), abs=1e-3)


def test_speed_is_recorded_at_one_thread_and_the_builders_threads(manifest: Manifest) -> None:
    threads = llm_pipeline.speed_threads(BuildOptions())
    for record in manifest.variants.values():
        assert record.llm is not None
        assert [s.threads for s in record.llm.speed] == threads
        for s in record.llm.speed:
            assert s.ttft_ms > 0 and s.itl_ms > 0
            assert s.decode_tok_s == pytest.approx(1000 / s.itl_ms, rel=0.01)
        assert record.speed["throughput"] == record.llm.speed[-1].decode_tok_s
    assert manifest.variants["fp32"].speed["speedup_vs_fp32"] == 1.0


def test_table_names_the_figures_and_the_cpu(
    tiny_llm_repository: Path, manifest: Manifest, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = f"hf:{tiny_llm_repository.parent / 'tiny_llm_hf' / 'tinyllm'}"
    work = tiny_llm_repository.parent / "tiny_llm_table_repo"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(tiny_llm_repository, work, symlinks=True)
    # every variant exists: nothing is rebuilt, the table comes from the manifest
    assert cli.main([spec, "--repository", str(work), "--quiet"]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("| precision"))
    for column in ("MB", "ppl", "KL", "top-1 agree", "TTFT ms", "ITL ms", "tok/s"):
        assert f" {column} " in header
    assert str(manifest.host["model"]) in out
    assert "prompt 128 tokens, 64 new tokens" in out
    assert all(f"| {p} " in out for p in PRECISIONS)


def test_kl_budget_drops_int4_and_names_the_fastest_within(
    tiny_llm_repository: Path, manifest: Manifest, tmp_path: Path
) -> None:
    int8, int4 = manifest.variants["int8"].llm, manifest.variants["int4"].llm
    assert int8 and int4
    budget = (int8.kl_mean + int4.kl_mean) / 2
    text = tmp_path / "text.txt"
    text.write_text((Path(llm_pipeline.__file__).parent / "eval_text.txt").read_text()[:3000])
    spec = f"hf:{tiny_llm_repository.parent / 'tiny_llm_hf' / 'tinyllm'}"
    options = BuildOptions(
        repository=tmp_path / "repo",
        precisions=list(PRECISIONS),
        kl_budget=budget,
        eval_data=text,
        progress=False,
        measure_speed=False,
    )
    built = llm_pipeline.build_llm(llm_pipeline_model(spec), options)
    assert list(built.variants) == ["fp32", "int8"]
    assert not (tmp_path / "repo" / "tinyllm_int4").exists()
    assert any(n.startswith("int4 not written: budget not met: KL") for n in built.notes)
    assert built.variants["int8"].details["budget_met"] is True
    assert built.llm is not None and built.llm.eval_text == f"--eval-data {text}"
    # without speed figures the choice falls to the first listed within budget
    assert any(n.startswith("budget: fastest variant within it:") for n in built.notes)


def llm_pipeline_model(spec: str):
    from builder.sources import load_llm

    return load_llm(spec, Path("."))


def test_budget_picks_the_fastest_variant_within_it(manifest: Manifest) -> None:
    copy = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    options = BuildOptions(accuracy_budget=1e9)
    for record in copy.variants.values():
        llm_pipeline._budget(record, options)
    llm_pipeline._choose_within_budget(copy, options)
    fastest = max(copy.variants, key=lambda p: copy.variants[p].speed["decode_tok_s"])
    assert [p for p, v in copy.variants.items() if v.details["fastest_within_budget"]] == [fastest]
    # a budget only fp32 meets
    tight = BuildOptions(kl_budget=0.0)
    for record in copy.variants.values():
        llm_pipeline._budget(record, tight)
    llm_pipeline._choose_within_budget(copy, tight)
    assert [p for p, v in copy.variants.items() if v.details["budget_met"]] == ["fp32"]
    assert copy.variants["fp32"].details["fastest_within_budget"] is True


def test_int4_block_size_option_builds_a_loadable_model(tiny_llama: Path, tmp_path: Path) -> None:
    options = BuildOptions(
        repository=tmp_path / "repo",
        precisions=["int4"],
        progress=False,
        measure_speed=False,
        extra={"int4": {"block_size": 128}},
    )
    built = llm_pipeline.build_llm(llm_pipeline_model(f"hf:{tiny_llama}"), options)
    record = built.variants["int4"]
    assert record.llm is not None and record.llm.genai_options == {"block_size": "128"}
    model = GenaiModel(tmp_path / "repo" / record.file, threads=1)
    chunks = list(stream_text(model, model.encode("Hi"), SamplingParams(max_tokens=3)))
    assert sum(c.tokens for c in chunks) == 3
    assert math.isfinite(record.llm.ppl)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_cuda_precisions_are_refused_on_cpu_in_one_line(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], precision: str
) -> None:
    repo = tmp_path / "repo"
    argv = [f"hf:{tiny_llama}", "--precisions", f"fp32,{precision}", "--repository", str(repo)]
    assert cli.main([*argv, "--quiet"]) == 2
    line = _error_line(capsys)
    assert precision in line and "CUDA" in line
    assert not list(repo.glob("*_fp32")), "nothing may be built before the refusal"


def test_unknown_llm_precision_is_one_line(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [f"hf:{tiny_llama}", "--precisions", "int8-dynamic", "--repository", str(tmp_path)]
    assert cli.main([*argv, "--quiet"]) == 2
    assert "not built for decoder LLMs" in _error_line(capsys)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"architectures": ["FalconForCausalLM"]}, "does not build FalconForCausalLM"),
        ("{not json", "not valid JSON"),
    ],
)
def test_hf_folder_that_is_no_buildable_causal_lm_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: object, needle: str
) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    text = config if isinstance(config, str) else json.dumps(config)
    (folder / "config.json").write_text(text)
    argv = [f"hf:{folder}", "--repository", str(tmp_path / "repo"), "--quiet"]
    assert cli.main(argv) == 2
    assert needle in _error_line(capsys)


def test_empty_eval_text_is_one_line(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    argv = [f"hf:{tiny_llama}", "--eval-data", str(empty), "--repository", str(tmp_path / "r")]
    assert cli.main([*argv, "--quiet", "--precisions", "fp32"]) == 2
    assert "is empty" in _error_line(capsys)


def test_encoder_folder_is_not_an_llm(tmp_path: Path) -> None:
    from builder.sources import llm_source

    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    assert llm_source(f"hf:{folder}") is None
    assert llm_source("minilm") is None and llm_source("smollm2") is not None
