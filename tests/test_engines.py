"""Engines (registry, ONNX Runtime vs OpenVINO), the bf16 precision, the measured engine choice,
the Triton backend for OpenVINO variants and the INT8 choices."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from tritonclient.grpc import model_config_pb2 as mc

from builder import engine_choice, hostinfo
from builder.errors import BuildError
from builder.pipeline import BuildOptions, build_model
from builder.precisions import get_precision
from builder.precisions.base import VariantResult
from builder.precisions.int8 import host_quant_types
from builder.sources.base import Dataset, LoadedModel
from common.engines import EngineError, get_engine
from common.model_repository import ServingOptions, build_model_config, load_manifests, read_config
from tests.helpers import make_tiny_onnx, skip_or_fail

ENGINES = [("onnxruntime", {}), ("openvino", {}), ("openvino", {"inference_precision": "bf16"})]


@pytest.fixture(scope="module")
def openvino_ok() -> None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        skip_or_fail("openvino is not installed")


def _x(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, 16)).astype(np.float32)


def _fake_cpu(flags: list[str]):
    def cpu_info() -> dict[str, object]:
        return {"model": "simulated CPU", "machine": "x86_64", "cores": 2, "flags": flags}

    return cpu_info


def _build(onnx_path: Path, repo: Path, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("measure_speed", False)
    return build_model(f"onnx:{onnx_path}", BuildOptions(repository=repo, **kw))


# ---- registry and engines --------------------------------------------------------------------


def test_unknown_engine_is_a_clear_error() -> None:
    with pytest.raises(EngineError, match=r"unknown engine 'tensorflow'.*onnxruntime.*openvino"):
        get_engine("tensorflow")


@pytest.mark.parametrize(("engine", "options"), ENGINES)
def test_engines_agree_with_onnxruntime_at_any_batch(
    tiny_onnx: Path, openvino_ok: None, engine: str, options: dict
) -> None:
    reference = get_engine("onnxruntime").load(tiny_onnx, {}, 1)
    session = get_engine(engine).load(tiny_onnx, options, 1)
    assert [(s.name, s.dtype) for s in session.inputs] == [("x", np.float32)]
    assert [(s.name, s.dtype) for s in session.outputs] == [("logits", np.float32)]
    for rows in (1, 5, 32):
        x = _x(rows, rows)
        out = session.run({"x": x})
        assert set(out) == {"logits"}
        assert out["logits"].shape == (rows, 4) and out["logits"].dtype == np.float32
        # bf16 hint: exact here without native BF16 (f32 fallback), ~3 digits with AMX.
        atol = 0.1 if options.get("inference_precision") == "bf16" else 1e-4
        np.testing.assert_allclose(out["logits"], reference.run({"x": x})["logits"], atol=atol)


def test_openvino_runs_concurrent_calls_correctly(tiny_onnx: Path, openvino_ok: None) -> None:
    session = get_engine("openvino").load(tiny_onnx, {"performance_hint": "THROUGHPUT"}, 1)
    x = _x(8)
    expected = session.run({"x": x})["logits"]
    got: dict[int, np.ndarray] = {}

    def worker(i: int) -> None:
        for _ in range(20):
            got[i] = session.run({"x": x[i : i + 1]})["logits"]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        np.testing.assert_allclose(got[i], expected[i : i + 1], atol=1e-5)


def test_openvino_bad_input_and_options_name_the_problem(
    tiny_onnx: Path, openvino_ok: None
) -> None:
    session = get_engine("openvino").load(tiny_onnx)
    with pytest.raises(EngineError, match="input 'x' is missing"):
        session.run({"y": _x(1)})
    with pytest.raises(EngineError, match="input 'x' expects float32, got float64"):
        session.run({"x": _x(1).astype(np.float64)})
    with pytest.raises(EngineError, match="input 'x' expects rank 2"):
        session.run({"x": np.zeros(16, np.float32)})
    with pytest.raises(EngineError, match="inference_precision must be one of f32, bf16"):
        get_engine("openvino").load(tiny_onnx, {"inference_precision": "int4"})
    with pytest.raises(EngineError, match="unknown option"):
        get_engine("openvino").load(tiny_onnx, {"precision": "bf16"})
    with pytest.raises(EngineError, match="cannot load"):
        get_engine("openvino").load(tiny_onnx.with_name("missing.onnx"))


def test_openvino_makes_a_static_batch_dynamic_and_keeps_declared_dtypes(
    tmp_path: Path, openvino_ok: None
) -> None:
    """A model exported with batch 1 and an int64 output (ArgMax): any batch runs, int64 stays."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("ArgMax", ["r"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "static",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [
            helper.make_tensor_value_info("r", TensorProto.FLOAT, [1, 16]),
            helper.make_tensor_value_info("label", TensorProto.INT64, [1]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "static.onnx"
    onnx.save(model, path)
    session = get_engine("openvino").load(path)
    assert [(s.name, s.dtype, s.shape) for s in session.inputs] == [("x", np.float32, (-1, 16))]
    assert [(s.name, s.dtype) for s in session.outputs] == [("r", np.float32), ("label", np.int64)]
    x = _x(6)
    out = session.run({"x": x})
    assert list(out) == ["r", "label"]
    assert out["label"].dtype == np.int64 and out["label"].shape == (6,)
    np.testing.assert_array_equal(out["label"], np.maximum(x, 0).argmax(axis=1))


# ---- bf16 ------------------------------------------------------------------------------------


def test_bf16_variant_on_a_host_with_native_bf16(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, openvino_ok: None
) -> None:
    monkeypatch.setattr(hostinfo, "cpu_info", _fake_cpu(["avx512f", "amx_bf16", "amx_int8"]))
    manifest = _build(tiny_onnx, tmp_path, precisions=["fp32", "bf16"])
    bf16 = manifest.variants["bf16"]
    assert bf16.engine == "openvino"
    assert bf16.engine_options == {"inference_precision": "bf16"}
    assert bf16.details["inference_precision_hint"] == "bf16"
    assert bf16.quality["cosine_mean"] > 0.999 and bf16.quality["top1_agreement"] == 1.0
    assert "amx_bf16" in manifest.host["flags"]
    # The standard Triton config: the OpenVINO backend with its BF16 hint, reading model.onnx.
    cfg = read_config(tmp_path / "tiny_bf16")
    assert (cfg.platform, cfg.backend, cfg.default_model_filename) == (
        "",
        "openvino",
        "model.onnx",
    )
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["HINT_BF16"] == "YES" and params["ENABLE_BATCH_PADDING"] == "YES"
    # Runs correctly here too: without native BF16 OpenVINO keeps f32; with it, ~3 digits.
    x = _x(7)
    fp32 = get_engine("onnxruntime").load(tmp_path / manifest.variants["fp32"].file)
    session = get_engine(bf16.engine).load(tmp_path / bf16.file, bf16.engine_options)
    np.testing.assert_allclose(
        session.run({"x": x})["logits"], fp32.run({"x": x})["logits"], atol=0.1
    )


def test_no_bf16_variant_without_native_bf16_and_the_manifest_says_why(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hostinfo, "cpu_info", _fake_cpu(["avx2"]))
    manifest = _build(tiny_onnx, tmp_path, precisions=["fp32", "bf16"])
    assert set(manifest.variants) == {"fp32"}
    assert not (tmp_path / "tiny_bf16").exists()
    notes = " ".join(load_manifests(tmp_path)["tiny"].notes)
    assert "bf16 skipped: CPU reports neither amx_bf16 nor avx512_bf16" in notes


def test_bf16_is_skipped_when_another_engine_is_forced(
    tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hostinfo, "cpu_info", _fake_cpu(["amx_bf16"]))
    model = _loaded(transformer=False)
    reason = get_precision("bf16").skip_reason(model, BuildOptions(engine="onnxruntime"))
    assert reason and "--engine onnxruntime" in reason


# ---- engine choice ---------------------------------------------------------------------------


def _fake_speed(throughput: dict[str, float], calls: list | None = None):
    """A measure_speed stand-in: the throughput of the engine behind each session."""

    def engine_of(session: object) -> str:
        return "openvino" if type(session).__name__ == "OpenVinoSession" else "onnxruntime"

    def measure(sessions, sample, batch_size, rounds=5, latency_runs=10):
        if calls is not None:
            calls.append(sorted(sessions))
        return {
            name: {
                "latency_ms_p50": 1.0,
                "throughput": throughput[engine_of(s)],
                "batch_size": float(batch_size),
            }
            for name, s in sessions.items()
        }

    return measure


def test_engine_choice_records_the_fastest_engine(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, openvino_ok: None
) -> None:
    calls: list = []
    speeds = {"onnxruntime": 100.0, "openvino": 250.0}
    monkeypatch.setattr(engine_choice, "measure_speed", _fake_speed(speeds, calls))
    manifest = _build(tiny_onnx, tmp_path, precisions=["fp32", "int8"], measure_speed=True)
    # Both candidates were timed, round-robin, one engine per measure_speed call.
    assert calls[:6] == [["onnxruntime"], ["openvino"]] * 3
    for precision in ("fp32", "int8"):
        v = manifest.variants[precision]
        assert v.engine == "openvino" and v.engine_options == {"inference_precision": "f32"}
        timings = v.details["engine_timings"]
        assert timings["openvino"]["throughput"] == 250.0
        assert timings["onnxruntime"]["throughput"] == 100.0
        assert v.details["engine_choice"].startswith("openvino: fastest measured (2.50x")
        cfg = read_config(tmp_path / v.triton_name)
        assert cfg.backend == "openvino" and not cfg.platform
        assert "HINT_BF16" not in cfg.parameters
        # The manifest's speed (what the `auto` policy reads) was measured on the chosen engine.
        assert v.speed["throughput"] == 250.0
    assert ["fp32"] in calls and ["int8"] in calls  # the final speed pass, per variant


def test_engine_choice_keeps_the_own_engine_unless_clearly_faster(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, openvino_ok: None
) -> None:
    speeds = {"onnxruntime": 100.0, "openvino": 102.0}  # within noise
    monkeypatch.setattr(engine_choice, "measure_speed", _fake_speed(speeds))
    manifest = _build(tiny_onnx, tmp_path, precisions=["fp32"], measure_speed=True)
    v = manifest.variants["fp32"]
    assert v.engine == "onnxruntime" and v.engine_options == {}
    assert read_config(tmp_path / "tiny_fp32").platform == "onnxruntime_onnx"


def test_engine_override_is_honoured_without_measuring(
    tiny_onnx: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, openvino_ok: None
) -> None:
    calls: list = []
    monkeypatch.setattr(engine_choice, "measure_speed", _fake_speed({}, calls))
    manifest = _build(tiny_onnx, tmp_path, precisions=["fp32"], engine="openvino")
    v = manifest.variants["fp32"]
    assert v.engine == "openvino" and v.details["engine_choice"].startswith("--engine openvino")
    assert "engine_timings" not in v.details and calls == []
    with pytest.raises(BuildError, match="unknown engine 'nope'"):
        _build(tiny_onnx, tmp_path / "other", precisions=["fp32"], engine="nope")


class _StubEvaluator:
    """Quality by engine: OpenVINO 'loses' 3 points on this file."""

    def quality(self, path, engine="onnxruntime", options=None):
        loss = 3.0 if engine == "openvino" else 0.0
        return {"finite": 1.0, "accuracy_loss": loss, "cosine_mean": 1.0}


def test_a_faster_engine_that_loses_quality_is_rejected(
    tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch, openvino_ok: None
) -> None:
    speeds = {"onnxruntime": 100.0, "openvino": 500.0}
    monkeypatch.setattr(engine_choice, "measure_speed", _fake_speed(speeds))
    sample = Dataset({"x": _x(8)})
    choice = engine_choice.choose_engine(
        VariantResult(tiny_onnx), tiny_onnx, _StubEvaluator(), sample, 8
    )
    assert choice.engine == "onnxruntime"
    assert "accuracy loss 3.000 points" in choice.rejected["openvino"]
    assert choice.reason == "onnxruntime: the only engine that passed (rejected: openvino)"
    assert choice.details()["engine_rejected"] == choice.rejected
    # A variant whose options pin its engine (bf16) is never moved, nor forced elsewhere.
    pinned = VariantResult(tiny_onnx, "openvino", {"inference_precision": "bf16"})
    assert engine_choice.candidates(pinned.engine, pinned.engine_options) == [
        ("openvino", {"inference_precision": "bf16"})
    ]
    with pytest.raises(BuildError, match="--engine onnxruntime cannot run it"):
        engine_choice.choose_engine(
            pinned, tiny_onnx, _StubEvaluator(), sample, 8, forced="onnxruntime"
        )


class _SameQuality:
    def quality(self, path, engine="onnxruntime", options=None):
        return {"finite": 1.0, "accuracy_loss": 0.0, "cosine_mean": 1.0}


def _noisy_speed(rounds: dict[str, list[float]]):
    """A measure_speed stand-in, a noisy timer: each call for an engine returns that engine's
    next round value."""
    seen: dict[str, int] = {}

    def engine_of(session: object) -> str:
        return "openvino" if type(session).__name__ == "OpenVinoSession" else "onnxruntime"

    def measure(sessions, sample, batch_size, rounds=5, latency_runs=10):
        ((name, session),) = sessions.items()
        engine = engine_of(session)
        i = seen[engine] = seen.get(engine, -1) + 1
        return {name: {"latency_ms_p50": 1.0, "throughput": values[engine][i],
                       "batch_size": float(batch_size)}}  # fmt: skip

    values = rounds
    return measure


@pytest.mark.parametrize(
    ("openvino_rounds", "chosen", "verdict"),
    [
        ([110.0, 140.0, 125.0], "onnxruntime", "within noise"),  # +25 % lead, 40 % spread
        ([260.0, 230.0, 250.0], "openvino", "beyond noise"),  # +150 % lead, 40 % spread
    ],
    ids=["lead-inside-spread", "lead-beyond-spread"],
)
def test_engine_choice_switches_only_on_a_lead_beyond_the_spread(
    tiny_onnx: Path,
    monkeypatch: pytest.MonkeyPatch,
    openvino_ok: None,
    openvino_rounds: list[float],
    chosen: str,
    verdict: str,
) -> None:
    # ONNX Runtime (the precision's own engine) measures 80..120 over three rounds: 40 % spread.
    rounds = {"onnxruntime": [120.0, 80.0, 100.0], "openvino": openvino_rounds}
    monkeypatch.setattr(engine_choice, "measure_speed", _noisy_speed(rounds))
    loads = iter([0.5, 0.7])
    monkeypatch.setattr(hostinfo, "load_average", lambda: next(loads))
    monkeypatch.setattr(hostinfo, "cpu_info", _fake_cpu(["avx2"]))
    choice = engine_choice.choose_engine(
        VariantResult(tiny_onnx), tiny_onnx, _SameQuality(), Dataset({"x": _x(8)}), 8
    )
    assert choice.engine == chosen
    d = choice.details()
    decision = d["engine_decision"]
    assert decision["verdict"] == verdict and decision["fastest"] == "openvino"
    assert decision["noise"] == pytest.approx(0.4)
    assert decision["chosen"] == chosen and decision["default"] == "onnxruntime"
    # the load average is the highest seen around the timing; 0.7 on 2 cores is not busy
    assert (decision["load_average"], decision["cores"], decision["busy"]) == (0.7, 2, False)
    ort = d["engine_timings"]["onnxruntime"]
    assert ort["throughput_rounds"] == [120.0, 80.0, 100.0]
    assert (ort["throughput_min"], ort["throughput"], ort["throughput_max"]) == (80, 100, 120)
    assert ort["spread"] == pytest.approx(0.4)
    assert d["engine_timings"]["openvino"]["throughput_rounds"] == openvino_rounds
    if chosen == "onnxruntime":
        assert choice.reason == (
            "onnxruntime: within noise (openvino 1.25x onnxruntime, inside the 40% spread)"
        )
    else:
        assert choice.reason == (
            "openvino: fastest measured (2.50x onnxruntime, beyond the 40% spread)"
        )
        assert choice.options == {"inference_precision": "f32"}


def test_spread_is_the_range_for_few_rounds_and_the_iqr_for_many() -> None:
    from common.engine_lead import judge, summary

    assert summary([80.0, 100.0, 120.0])["spread"] == pytest.approx(0.4)
    # seven rounds, one stray: the IQR (96.5..101) ignores it, max - min would be 65 %
    many = [100.0, 95.0, 105.0, 40.0, 100.0, 98.0, 102.0]
    s = summary(many)
    assert (s["min"], s["median"], s["max"], s["rounds"]) == (40, 100, 105, 7)
    assert s["spread"] == pytest.approx(0.045)
    lead = judge("onnxruntime", {"onnxruntime": many, "openvino": [x * 1.2 for x in many]})
    assert lead.chosen == "openvino" and lead.verdict == "beyond noise"
    assert lead.describe() == "openvino leads onnxruntime by +20% beyond the 4% spread"
    # a lead under MIN_GAIN never switches, however quiet the rounds
    quiet = judge("onnxruntime", {"onnxruntime": [100.0] * 3, "openvino": [103.0] * 3})
    assert quiet.chosen == "onnxruntime" and quiet.verdict == "within noise"


@pytest.mark.parametrize(("load", "busy"), [(5.0, True), (1.5, False)])
def test_a_busy_host_is_flagged_in_the_manifest_and_the_table(
    tiny_onnx: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    openvino_ok: None,
    load: float,
    busy: bool,
) -> None:
    from builder.report import summary

    rounds = {"onnxruntime": [100.0, 90.0, 110.0] * 3, "openvino": [105.0, 100.0, 110.0] * 3}
    monkeypatch.setattr(engine_choice, "measure_speed", _noisy_speed(rounds))
    monkeypatch.setattr(hostinfo, "cpu_info", _fake_cpu(["avx2"]))  # 2 cores
    monkeypatch.setattr(hostinfo, "load_average", lambda: load)
    manifest = _build(tiny_onnx, tmp_path, precisions=["fp32"], measure_speed=True)
    v = manifest.variants["fp32"]
    assert v.engine == "onnxruntime" and v.details["engine_decision"]["verdict"] == "within noise"
    assert v.details["engine_decision"]["busy"] is busy
    assert manifest.host["load_average"] == load and manifest.host["busy"] is busy
    saved = load_manifests(tmp_path)["tiny"]
    assert saved.host["busy"] is busy
    notes = [n for n in saved.notes if n.startswith("busy host: ")]
    table = summary(saved)
    assert "engine: fp32 onnxruntime: within noise (openvino 1.05x" in table
    if busy:
        (note,) = notes
        assert "load average up to 5.00 over 2 cores" in note
        assert "engine kept within noise for fp32" in note
        assert "note: busy host: " in table and "load average up to 5.00: BUSY" in table
        assert "busy host: load average 5.00 over 2 cores" in v.details["engine_choice"]
    else:
        assert notes == [] and "BUSY" not in table and "busy host" not in table


# ---- Triton config for OpenVINO variants -----------------------------------------------------


def test_openvino_config_round_trips_through_the_protobuf() -> None:
    from google.protobuf import text_format

    from builder.triton_backend import standard_backend
    from common.model_repository import TensorSpec

    kwargs = standard_backend(
        "openvino", {"inference_precision": "bf16", "num_streams": 2}, "model.onnx", 8
    )
    cfg = build_model_config(
        "m_bf16",
        [TensorSpec("x", "float32", [16])],
        [TensorSpec("logits", "float32", [4])],
        ServingOptions(max_batch_size=8),
        **kwargs,
    )
    parsed = text_format.Parse(text_format.MessageToString(cfg), mc.ModelConfig())
    assert parsed.backend == "openvino" and parsed.default_model_filename == "model.onnx"
    assert {k: v.string_value for k, v in parsed.parameters.items()} == {
        "PERFORMANCE_HINT": "LATENCY",
        "HINT_BF16": "YES",
        "NUM_STREAMS": "2",
        "ENABLE_BATCH_PADDING": "YES",
    }
    assert standard_backend("onnxruntime", {}, "model.onnx", 8) == {"platform": "onnxruntime_onnx"}


# ---- INT8 choices ----------------------------------------------------------------------------


def _loaded(transformer: bool) -> LoadedModel:
    return LoadedModel(
        name="m",
        source="test",
        task="embedding",
        fp32_onnx=Path("m.onnx"),
        inputs=[],
        outputs=[],
        calibration=Dataset({}),
        evaluation=Dataset({}),
        transformer=transformer,
    )


def test_static_int8_on_a_transformer_needs_an_accuracy_budget() -> None:
    int8 = get_precision("int8")
    reason = int8.skip_reason(_loaded(True), BuildOptions())
    assert reason and "--accuracy-budget" in reason and "0.36" in reason
    assert int8.skip_reason(_loaded(True), BuildOptions(accuracy_budget=1.0)) is None
    assert int8.skip_reason(_loaded(False), BuildOptions()) is None


def test_int8_qoperator_format_is_built_and_recorded(tmp_path: Path) -> None:
    src = make_tiny_onnx(tmp_path / "tiny.onnx")
    manifest = _build(
        src, tmp_path / "repo", precisions=["int8"], extra={"int8_format": "QOperator"}
    )
    v = manifest.variants["int8"]
    assert v.details["format"] == "QOperator"
    ops = {n.op_type for n in onnx.load(tmp_path / "repo" / v.file).graph.node}
    assert any(op.startswith(("QLinear", "QGemm")) or op.endswith("Integer") for op in ops), ops
    # U8 activations x S8 weights on x86 (S8S8 is no faster than FP32 there).
    types = host_quant_types()
    assert (v.details["activation_type"], v.details["weight_type"]) == (
        types.activation,
        types.weight,
    )
    if hostinfo.cpu_info()["machine"] in ("x86_64", "AMD64"):
        assert (types.activation, types.weight) == ("QUInt8", "QInt8")
