"""int4 (4-bit weight-only, ONNX Runtime MatMulNBits): options, refusal of non-transformer
models through the CLI, the opt-in build, and the issue's must-show figures on MiniLM (a real
build, cached under the precision-serve cache between runs)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from builder.errors import BuildError
from builder.precisions.int4_options import Int4Options
from tests.helpers import make_tiny_onnx

ROOT = Path(__file__).resolve().parents[1]
INT4_SOURCES = [
    ROOT / "builder" / "precisions" / name
    for name in ("int4.py", "int4_quant.py", "int4_options.py", "budgeted.py")
] + [ROOT / "builder" / "pipeline.py", ROOT / "builder" / "sources" / "hf_folder.py"]


def _cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "builder.cli", *args, "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def _ops(path: Path) -> Counter[str]:
    import onnx

    return Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def test_int4_options_name_the_bad_field() -> None:
    with pytest.raises(BuildError, match="block_size must be one of 32, 64, 128, got 48"):
        Int4Options(block_size=48)
    with pytest.raises(BuildError, match="algorithm must be one of rtn, hqq, gptq, got 'awq'"):
        Int4Options.from_extra({"int4": {"algorithm": "awq"}})
    assert Int4Options.from_extra({}).block_size == 32


def test_non_transformer_gets_one_line_and_exit_2(tmp_path: Path) -> None:
    tiny = make_tiny_onnx(tmp_path / "tiny.onnx")
    got = _cli(f"onnx:{tiny}", "--precisions", "fp32,int4", "--repository", str(tmp_path / "r"))
    assert got.returncode == 2, got
    lines = got.stderr.strip().splitlines()
    assert len(lines) == 1, got.stderr
    assert "Traceback" not in got.stderr
    assert "not a transformer source" in lines[0] and "--int4-any-model" in lines[0], lines
    assert "2 MatMul" in lines[0], lines
    assert not (tmp_path / "r" / "tiny_fp32").exists()  # refused before any work


def test_cnn_refusal_says_its_weights_are_conv(tmp_path: Path) -> None:
    got = _cli("digits", "--precisions", "int4", "--repository", str(tmp_path / "r"))
    assert got.returncode == 2, got
    line = got.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, got.stderr
    assert "0 MatMul and 0 embedding Gather weights" in line and "Conv" in line, line
    assert "not a transformer source" in line and "use int8" in line, line
    assert not list((tmp_path / "r").glob("digits*")), "refused, so nothing was written"


def _mlp(path: Path) -> Path:
    """x [batch, 64] -> MatMul -> Relu -> MatMul -> y [batch, 8]: MatMul weights, no bias (a
    MatMul + Add would be fused into a Gemm by the FP32 reference's optimisation)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.2, (64, 64)).astype(np.float32)
    w2 = rng.normal(0, 0.2, (64, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_opt_in_builds_a_non_transformer(tmp_path: Path) -> None:
    tiny = _mlp(tmp_path / "tiny.onnx")
    repo = tmp_path / "r"
    got = _cli(
        f"onnx:{tiny}",
        "--precisions",
        "fp32,int4",
        "--int4-any-model",
        "--int4-block-size",
        "64",
        "--repository",
        str(repo),
        "--no-speed",
    )
    assert got.returncode == 0, got.stderr
    from common.model_repository import load_manifests

    v = load_manifests(repo)["tiny"].variants["int4"]
    assert v.details["block_size"] == 64 and v.details["quantized_matmuls"] == 2
    ops = _ops(repo / v.file)
    assert ops["MatMulNBits"] == 2 and ops["MatMul"] == 0, ops


# --- MiniLM: real builds (minutes on a loaded 2-core host), cached -------------------------


def _key() -> str:
    import onnxruntime

    h = hashlib.sha256(onnxruntime.__version__.encode())
    for p in INT4_SOURCES:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="session")
def minilm_int4_repository() -> Path:
    """minilm fp32 + int4 (rtn, block 32, no speed), built once per builder/ORT version."""
    from builder.cache import cache_root
    from builder.pipeline import BuildOptions, build_model

    repo = cache_root() / "tests" / f"minilm-int4-{_key()}"
    if (repo / "minilm.manifest.json").is_file():
        return repo
    tmp = repo.with_name(repo.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    build_model(
        "minilm",
        BuildOptions(
            repository=tmp, precisions=["fp32", "int4"], measure_speed=False, progress=False
        ),
    )
    shutil.rmtree(repo, ignore_errors=True)
    tmp.rename(repo)
    return repo


@pytest.mark.integration
@pytest.mark.slow
def test_minilm_int4_size_and_quality(minilm_int4_repository: Path) -> None:
    from common.model_repository import load_manifests

    m = load_manifests(minilm_int4_repository)["minilm"]
    fp32, int4 = m.variants["fp32"], m.variants["int4"]
    assert int4.size_bytes <= 0.25 * fp32.size_bytes, (int4.size_bytes, fp32.size_bytes)
    assert int4.quality["samples"] >= 100  # held-out real sentences
    assert 0.9 <= int4.quality["cosine_mean"] < 1.0, int4.quality
    assert int4.details["algorithm"] == "rtn" and int4.details["activations"] == "fp32"
    assert int4.details["quantized_embeddings"] >= 1
    ops = _ops(minilm_int4_repository / int4.file)
    assert ops["MatMulNBits"] >= 36 and ops["GatherBlockQuantized"] >= 1, ops
    assert int4.engine == "onnxruntime"


@pytest.mark.integration
@pytest.mark.slow
def test_minilm_int4_served_by_the_embedded_gateway(minilm_int4_repository: Path) -> None:
    import tritonclient.grpc as grpcclient

    from common.engines import get_engine
    from common.model_repository import load_manifests
    from server.runtime.runner import GatewayProcess

    repo = minilm_int4_repository
    m = load_manifests(repo)["minilm"]
    record = m.variants["int4"]
    samples = np.load(repo / "minilm.samples.npz")
    feed = {t.name: samples[t.name][:4].astype(t.dtype) for t in m.inputs}
    out = m.outputs[0].name
    want = get_engine(record.engine).load(repo / record.file, record.engine_options).run(feed)[out]
    config = (repo / record.triton_name / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in config or 'backend: "onnxruntime"' in config, config
    with GatewayProcess(repo, timeout=180) as gw:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        inputs = []
        for name, x in feed.items():
            i = grpcclient.InferInput(name, list(x.shape), "INT64")
            i.set_data_from_numpy(x)
            inputs.append(i)
        got = client.infer(record.triton_name, inputs).as_numpy(out)
        routed = client.infer("minilm", inputs, parameters={"precision": "int4"})
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert routed.get_response().model_name == record.triton_name
    np.testing.assert_allclose(routed.as_numpy(out), want, rtol=1e-4, atol=1e-5)


def test_budget_keeps_the_worst_layer_out_of_4_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The synthetic model whose ``ffn_out`` weights hold an outlier row: its 4-bit blocks round
    the ordinary weights to zero, so the budget keeps exactly it (as 8-bit MatMulNBits, or FP32
    with ``fallback: fp32``), though the (fake) timer calls every candidate slower than FP32:
    int4's search is untimed."""
    import onnx

    from builder import pipeline
    from builder.pipeline import BuildOptions, build_model
    from tests.test_budget_search import SENSITIVE, make_sensitive_transformer

    monkeypatch.setattr(pipeline, "_lazy_speedup", lambda ref, model, options: lambda p: 0.5)
    src = make_sensitive_transformer(tmp_path / "sensitive.onnx")

    def build(repo: Path, fallback: str, **kw: object):
        int4 = {"any_model": True, "fallback": fallback}
        options = BuildOptions(
            repository=repo, precisions=["fp32", "int4"], progress=False, extra={"int4": int4}
        )
        for k, v in kw.items():
            setattr(options, k, v)
        v = build_model(f"onnx:{src}", options).variants["int4"]
        bits = {
            n.name: next(a.i for a in n.attribute if a.name == "bits")
            for n in onnx.load(str(repo / v.file)).graph.node
            if n.op_type == "MatMulNBits"
        }
        return v.details, bits

    loose, bits = build(tmp_path / "loose", "int8", measure_speed=False)
    assert loose["accuracy_loss"] > 5.0 and loose["fp32_kept_nodes"] == [], loose
    assert set(bits.values()) == {4} and len(bits) == 5, bits

    eight, bits = build(tmp_path / "eight", "int8", accuracy_budget=3.0, measure_speed=True)
    assert eight["budget_met"] is True, eight["budget_status"]
    assert eight["fp32_kept_nodes"] == [SENSITIVE] and eight["kept_nodes_as"].startswith("8-bit")
    assert bits.pop(f"{SENSITIVE}_Q8") == 8, bits
    assert set(bits.values()) == {4} and len(bits) == 4, bits

    fp32, bits = build(tmp_path / "fp32", "fp32", accuracy_budget=1.5, measure_speed=True)
    assert fp32["budget_met"] is True and fp32["accuracy_loss"] <= 1.5, fp32["budget_status"]
    assert fp32["fp32_kept_nodes"] == [SENSITIVE] and fp32["kept_nodes_as"] == "FP32"
    assert len(bits) == 4 and not any(n.startswith(SENSITIVE) for n in bits), bits


def test_quantizer_import_leaves_root_logging_alone() -> None:
    """ORT's matmul_nbits_quantizer calls logging.basicConfig(level=INFO) on import; the
    builder's import of it must not configure the host program's root logger."""
    code = (
        "import logging\n"
        "from builder.precisions.int4_quant import nbits_module\n"
        "nbits_module()\n"
        "root = logging.getLogger()\n"
        "assert not root.handlers and root.level == logging.WARNING, (root.handlers, root.level)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    got = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert got.returncode == 0, got.stderr
