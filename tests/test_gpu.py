"""The GPU path (issue 7), tested as far as a CPU allows.

What runs here for real: GPU config generation (parsed back into Triton's ``ModelConfig``), the
symmetric INT8 Q/DQ file for TensorRT (ONNX Runtime quantization, inspected node by node), the
missing-CUDA message, and ``--configs-only``. The TensorRT engine build runs against a FAKE
``tensorrt`` module (``FakeTensorRT`` below, put into ``sys.modules`` by a fixture) that records
the calls the code makes; it proves the call sequence, not that TensorRT accepts it. Only the
``gpu``-marked test at the end builds and runs a real engine, and it is skipped without a GPU.
"""

from __future__ import annotations

import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from builder.errors import BuildError
from builder.gpu import device
from builder.gpu.configs import onnxruntime_tensorrt_config, tensorrt_plan_config
from builder.gpu.device import GpuInfo, check_gpu_available
from builder.gpu.errors import EngineBuildError, GpuUnavailableError
from builder.gpu.quant import quantize_for_tensorrt, tensorrt_qdq_problems, weight_quantization
from builder.gpu.target import GpuTargetOptions, build_gpu_target
from builder.gpu.tensorrt_build import EngineBuildOptions, build_engine, profile_shapes
from builder.sources.base import Dataset
from common.model_repository import (
    CONFIG_NAME,
    Manifest,
    ServingOptions,
    TensorSpec,
    VariantRecord,
    build_model_config,
    load_manifest,
    write_config,
)
from tests.helpers import make_tiny_onnx

INPUTS = [TensorSpec("x", "float32", [16])]
OUTPUTS = [TensorSpec("logits", "float32", [4])]
FAKE_GPU = GpuInfo(0, "Fake GPU (test)", "8.6", 24 << 30, "12.8")


def _calibration(rows: int = 64) -> Dataset:
    return Dataset({"x": np.random.default_rng(1).normal(size=(rows, 16)).astype(np.float32)})


def _parse(path: Path) -> mc.ModelConfig:
    cfg = mc.ModelConfig()
    text_format.Parse(path.read_text(), cfg)
    return cfg


# ---- a small repository shaped like the builder's, made without the pipeline ----------------


@pytest.fixture(scope="module")
def cpu_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fp32 + fp16 (keep_io_types) + a CPU-style int8 (U8 activations: NOT TensorRT-ready)."""
    import onnx
    from onnxconverter_common import float16
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    from builder.calibration import DatasetReader

    repo = tmp_path_factory.mktemp("gpu_repo")
    fp32 = make_tiny_onnx(repo / "tiny_fp32" / "1" / "model.onnx")
    fp16 = repo / "tiny_fp16" / "1" / "model.onnx"
    fp16.parent.mkdir(parents=True)
    onnx.save(float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True), fp16)
    int8 = repo / "tiny_int8" / "1" / "model.onnx"
    int8.parent.mkdir(parents=True)
    quantize_static(
        str(fp32),
        str(int8),
        DatasetReader(_calibration()),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        per_channel=True,
    )
    serving = ServingOptions(max_batch_size=32, preferred_batch_sizes=[4, 8, 16])
    variants = {}
    for p in ("fp32", "fp16", "int8"):
        name = f"tiny_{p}"
        write_config(repo / name, build_model_config(name, INPUTS, OUTPUTS, serving))
        variants[p] = VariantRecord(p, name, f"{name}/1/model.onnx")
    Manifest("tiny", "onnx:tiny", "classification", INPUTS, OUTPUTS, 32, variants=variants).save(
        repo
    )
    return repo


@pytest.fixture
def repo(cpu_repository: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "repo"
    shutil.copytree(cpu_repository, dst)
    return dst


def _manifest(repo: Path) -> Manifest:
    return load_manifest(repo / "tiny.manifest.json")


# ---- configs ---------------------------------------------------------------------------------


def test_tensorrt_plan_config_parses_back_with_gpu_fields(tmp_path: Path) -> None:
    profile = profile_shapes([("x", (-1, 16))], EngineBuildOptions(max_batch_size=32))
    cfg = tensorrt_plan_config(
        "tiny_fp16_trt", INPUTS, OUTPUTS, ServingOptions(max_batch_size=32), ["8.6", "9.0"], profile
    )
    parsed = _parse(write_config(tmp_path / "m", cfg))
    assert parsed.platform == "tensorrt_plan"
    assert parsed.max_batch_size == 32
    assert [g.kind for g in parsed.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
    assert dict(parsed.cc_model_filenames) == {"8.6": "model_sm86.plan", "9.0": "model_sm90.plan"}
    assert parsed.default_model_filename == "model.plan"
    assert list(parsed.input[0].dims) == [16] and parsed.input[0].data_type == mc.TYPE_FP32
    assert list(parsed.model_warmup[0].inputs["x"].dims) == [16]


def test_single_target_plan_config_has_no_cc_map(tmp_path: Path) -> None:
    cfg = tensorrt_plan_config("m", INPUTS, OUTPUTS, ServingOptions(), ["9.0"])
    parsed = _parse(write_config(tmp_path / "m", cfg))
    assert not parsed.cc_model_filenames and parsed.default_model_filename == "model.plan"


def test_warmup_uses_profile_opt_for_dynamic_dims(tmp_path: Path) -> None:
    ids = [TensorSpec("input_ids", "int64", [-1])]
    options = EngineBuildOptions(max_batch_size=8, dim_ranges={"input_ids:1": (1, 64, 256)})
    profile = profile_shapes([("input_ids", (-1, -1))], options)
    assert profile["input_ids"].to_dict() == {"min": [1, 1], "opt": [8, 64], "max": [8, 256]}
    cfg = tensorrt_plan_config("enc", ids, OUTPUTS, ServingOptions(max_batch_size=8), (), profile)
    assert list(
        _parse(write_config(tmp_path / "e", cfg)).model_warmup[0].inputs["input_ids"].dims
    ) == [64]


@pytest.mark.parametrize(
    ("precision", "mode"), [("fp32", "FP32"), ("fp16", "FP16"), ("int8", "INT8")]
)
def test_onnxruntime_tensorrt_accelerator_config(tmp_path: Path, precision: str, mode: str) -> None:
    profile = profile_shapes([("x", (-1, 16))], EngineBuildOptions(max_batch_size=32))
    cfg = onnxruntime_tensorrt_config(
        f"tiny_{precision}_ort_trt",
        INPUTS,
        OUTPUTS,
        ServingOptions(max_batch_size=32),
        precision,
        engine_cache_path="/models/.cache/tensorrt/ort/x",
        timing_cache_path="/models/.cache/tensorrt/ort",
        profile=profile,
        workspace_bytes=1 << 30,
    )
    parsed = _parse(write_config(tmp_path / "m", cfg))
    assert parsed.platform == "onnxruntime_onnx"
    assert parsed.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    (accel,) = parsed.optimization.execution_accelerators.gpu_execution_accelerator
    assert accel.name == "tensorrt"
    assert dict(accel.parameters) == {
        "precision_mode": mode,
        "trt_engine_cache_enable": "true",
        "trt_engine_cache_path": "/models/.cache/tensorrt/ort/x",
        "trt_timing_cache_enable": "true",
        "trt_timing_cache_path": "/models/.cache/tensorrt/ort",
        "max_workspace_size_bytes": str(1 << 30),
        "trt_profile_min_shapes": "x:1x16",
        "trt_profile_opt_shapes": "x:32x16",
        "trt_profile_max_shapes": "x:32x16",
    }


def test_unknown_precision_has_no_precision_mode() -> None:
    with pytest.raises(ValueError, match="int8-dynamic"):
        onnxruntime_tensorrt_config("m", INPUTS, OUTPUTS, ServingOptions(), "int8-dynamic", "/c")


def test_dynamic_dim_without_range_is_named() -> None:
    options = EngineBuildOptions(max_batch_size=4, default_dim_range=None)
    with pytest.raises(EngineBuildError, match=r"input 'input_ids' axis 1 is dynamic"):
        profile_shapes([("input_ids", (-1, -1))], options)


# ---- INT8 for TensorRT: symmetric signed, per-channel weights --------------------------------


def test_int8_for_tensorrt_is_symmetric_int8_per_channel(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, numpy_helper

    fp32 = make_tiny_onnx(tmp_path / "tiny.onnx")
    out = tmp_path / "trt_int8.onnx"
    details = quantize_for_tensorrt(fp32, out, _calibration())
    assert details["activation_type"] == "int8" and details["symmetric_activations"] is True

    model = onnx.load(str(out))
    inits = {i.name: i for i in model.graph.initializer}
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert quantize, "no activations were quantized"
    for node in quantize + [n for n in model.graph.node if n.op_type == "DequantizeLinear"]:
        zp = inits[node.input[2]]
        assert zp.data_type == TensorProto.INT8, node.name
        assert not numpy_helper.to_array(zp).any(), f"{node.name}: zero point is not 0"
    weights = weight_quantization(out)
    assert set(weights) == {"w1_quantized", "w2_quantized"}
    for w in weights.values():
        assert w["stored_dtype"] == "INT8" and w["quant_dtype"] == "INT8"
        assert w["axis"] == 1 and w["channels"] == w["shape"][1]  # per output channel
    assert tensorrt_qdq_problems(out) == []

    # And it still computes the same function as FP32 (ONNX Runtime on CPU).
    import onnxruntime as ort

    x = _calibration(16).inputs["x"]
    ref = ort.InferenceSession(str(fp32)).run(None, {"x": x})[0]
    got = ort.InferenceSession(str(out)).run(None, {"x": x})[0]
    assert (ref.argmax(1) == got.argmax(1)).mean() >= 0.9


def test_cpu_style_int8_is_rejected_for_tensorrt(cpu_repository: Path) -> None:
    problems = tensorrt_qdq_problems(cpu_repository / "tiny_int8" / "1" / "model.onnx")
    assert any("UINT8" in p for p in problems), problems


# ---- no CUDA / no TensorRT ------------------------------------------------------------------


def test_missing_cuda_and_tensorrt_is_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(device, "_load_driver", lambda: None)
    message = check_gpu_available()
    assert message is not None and "\n" not in message
    assert "tensorrt" in message and "libcuda.so.1" in message
    assert "pip install 'precision-serve[gpu]'" in message
    assert "--configs-only" in message


def test_target_gpu_without_gpu_raises_the_message(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(device, "_load_driver", lambda: None)
    with pytest.raises(GpuUnavailableError) as err:
        build_gpu_target(_manifest(repo), repo, configs_only=False)
    assert isinstance(err.value, BuildError)
    assert str(err.value) == check_gpu_available()
    assert not (repo / "tiny_fp32_trt").exists()


def test_configs_only_writes_configs_and_onnx_without_engines(repo: Path) -> None:
    result = build_gpu_target(_manifest(repo), repo, configs_only=True, calibration=_calibration())
    assert result.gpu is None
    for p in ("fp32", "fp16", "int8"):
        trt_dir, ort_dir = repo / f"tiny_{p}_trt", repo / f"tiny_{p}_ort_trt"
        assert _parse(trt_dir / CONFIG_NAME).platform == "tensorrt_plan"
        assert _parse(ort_dir / CONFIG_NAME).platform == "onnxruntime_onnx"
        assert (trt_dir / "1" / "model.onnx").is_file() and (ort_dir / "1" / "model.onnx").is_file()
        assert sorted(p.name for p in (trt_dir / "1").iterdir()) == ["model.onnx"]  # no plan
    # fp16 is the FP16 ONNX as built; int8 was re-quantized symmetric (the CPU one is U8).
    assert (repo / "tiny_fp16_trt/1/model.onnx").read_bytes() == (
        repo / "tiny_fp16/1/model.onnx"
    ).read_bytes()
    assert tensorrt_qdq_problems(repo / "tiny_int8_trt/1/model.onnx") == []
    gpu = _manifest(repo).variants["int8"].details["gpu"]
    assert gpu["onnx"]["requantized"] is True
    assert gpu["onnx"]["quantization"]["symmetric_activations"] is True
    assert {r.status for r in result.results} == {"configs-only", "config"}
    lines = result.summary_lines()
    assert lines[0].startswith("GPU: none") and len(lines) == 1 + 6


def test_int8_without_calibration_names_the_problem(repo: Path) -> None:
    with pytest.raises(BuildError, match=r"not TensorRT-ready .*UINT8.* no calibration data"):
        build_gpu_target(
            _manifest(repo), repo, configs_only=True, options=GpuTargetOptions(precisions=["int8"])
        )


def test_unsupported_precisions_are_skipped_with_reason(repo: Path) -> None:
    options = GpuTargetOptions(precisions=["int8-dynamic"], backends=("tensorrt_plan",))
    (res,) = build_gpu_target(_manifest(repo), repo, configs_only=True, options=options).results
    assert res.status == "skipped" and "int8-dynamic" in res.reason


# ---- engine build against a FAKE tensorrt module ---------------------------------------------


class FakeTensorRT:
    """A FAKE stand-in for the ``tensorrt`` package (TensorRT 10 API surface), recording calls.

    It reads the ONNX inputs with ``onnx`` to shape its network like the real parser would, and
    its "engine" is a byte string. Nothing here checks that real TensorRT would accept the model.
    """

    def __init__(self, version: str = "10.13.0.35") -> None:
        self.calls: list[tuple[str, Any]] = []
        self.module = self._module(version)

    def _module(self, version: str) -> types.ModuleType:
        mod = types.ModuleType("tensorrt")
        mod.__version__ = version
        mod.__fake__ = True
        ilogger, logger, flag, pool, tensor, network, parser_error = self._network_classes()
        parser = self._parser_class(network, tensor, parser_error)
        config, profile = self._config_classes()
        builder = self._builder_class(network, config, profile)
        mod.ILogger, mod.Logger, mod.Builder, mod.OnnxParser = ilogger, logger, builder, parser
        mod.NetworkDefinitionCreationFlag, mod.MemoryPoolType = flag, pool
        return mod

    @staticmethod
    def _network_classes() -> tuple[type, ...]:
        class ILogger:
            def __init__(self) -> None:
                pass

        class Logger(ILogger):
            WARNING = 2

            def __init__(self, level: int = 2) -> None:
                super().__init__()

        class Flag:
            STRONGLY_TYPED = 1

        class Pool:
            WORKSPACE = 0

        class Tensor:
            def __init__(self, name: str, shape: tuple[int, ...]) -> None:
                self.name, self.shape = name, shape

        class Network:
            def __init__(self, flags: int) -> None:
                self.flags, self.inputs = flags, []

            @property
            def num_inputs(self) -> int:
                return len(self.inputs)

            def get_input(self, i: int) -> Tensor:
                return self.inputs[i]

        class ParserError:
            def __init__(self, desc: str) -> None:
                self._desc = desc

            def node_name(self) -> str:
                return ""

            def node(self) -> int:
                return -1

            def node_operator(self) -> str:
                return ""

            def desc(self) -> str:
                return self._desc

        return ILogger, Logger, Flag, Pool, Tensor, Network, ParserError

    def _parser_class(self, Network: type, Tensor: type, ParserError: type) -> type:
        fake = self

        class Parser:
            def __init__(self, network: Network, logger: Any) -> None:
                self.network, self.errors = network, []

            def parse_from_file(self, path: str) -> bool:
                import onnx

                fake.calls.append(("parse_from_file", path))
                try:
                    model = onnx.load(path)
                except Exception as e:
                    self.errors = [ParserError(f"cannot read model ({type(e).__name__})")]
                    return False
                for vi in model.graph.input:
                    dims = tuple(
                        d.dim_value if d.HasField("dim_value") else -1
                        for d in vi.type.tensor_type.shape.dim
                    )
                    self.network.inputs.append(Tensor(vi.name, dims))
                return True

            @property
            def num_errors(self) -> int:
                return len(self.errors)

            def get_error(self, i: int) -> ParserError:
                return self.errors[i]

        return Parser

    def _config_classes(self) -> tuple[type, type]:
        fake = self

        class TimingCache:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def serialize(self) -> bytes:
                return self.data + b"[timings]"

        class Profile:
            def set_shape(self, name: str, lo: Any, opt: Any, hi: Any) -> None:
                fake.calls.append(("set_shape", (name, tuple(lo), tuple(opt), tuple(hi))))

        class Config:
            def __init__(self) -> None:
                self.cache: TimingCache | None = None

            def set_memory_pool_limit(self, pool: int, size: int) -> None:
                fake.calls.append(("set_memory_pool_limit", (pool, size)))

            def add_optimization_profile(self, profile: Profile) -> int:
                fake.calls.append(("add_optimization_profile", None))
                return 0

            def create_timing_cache(self, data: bytes) -> TimingCache:
                fake.calls.append(("create_timing_cache", bytes(data)))
                return TimingCache(bytes(data))

            def set_timing_cache(self, cache: TimingCache, ignore_mismatch: bool) -> bool:
                fake.calls.append(("set_timing_cache", (cache.data, ignore_mismatch)))
                self.cache = cache
                return True

            def get_timing_cache(self) -> TimingCache | None:
                return self.cache

            def set_flag(self, flag: Any) -> None:  # must never be called (no FP16/INT8 flags)
                fake.calls.append(("set_flag", flag))

        return Config, Profile

    def _builder_class(self, Network: type, Config: type, Profile: type) -> type:
        fake = self

        class Builder:
            def __init__(self, logger: Any) -> None:
                fake.calls.append(("Builder", None))

            def create_network(self, flags: int = 0) -> Network:
                fake.calls.append(("create_network", flags))
                return Network(flags)

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Network, config: Config) -> bytes:
                fake.calls.append(("build_serialized_network", network.flags))
                return b"FAKE-PLAN:" + ",".join(t.name for t in network.inputs).encode()

        return Builder

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]

    def args(self, name: str) -> list[Any]:
        return [a for n, a in self.calls if n == name]


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch) -> FakeTensorRT:
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake.module)
    return fake


def test_engine_build_calls_against_fake_tensorrt(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    onnx_path = make_tiny_onnx(tmp_path / "tiny.onnx")
    cache = tmp_path / "repo" / ".cache" / "tensorrt" / "timing_sm86.cache"
    options = EngineBuildOptions(max_batch_size=32, workspace_bytes=1 << 28, timing_cache=cache)

    meta = build_engine(onnx_path, tmp_path / "m" / "1" / "model.plan", options, FAKE_GPU)

    assert fake_trt.args("create_network") == [1 << 1]  # 1 << STRONGLY_TYPED
    assert fake_trt.args("set_shape") == [("x", (1, 16), (32, 16), (32, 16))]
    assert fake_trt.args("set_memory_pool_limit") == [(0, 1 << 28)]
    assert "set_flag" not in fake_trt.names()  # precision comes from the ONNX, not builder flags
    assert fake_trt.args("create_timing_cache") == [b""]  # nothing to load the first time
    assert (tmp_path / "m/1/model.plan").read_bytes() == b"FAKE-PLAN:x"
    assert cache.read_bytes() == b"[timings]"
    assert meta["timing_cache"]["loaded"] is False
    assert meta["tensorrt_version"] == "10.13.0.35"
    assert meta["gpu_name"] == FAKE_GPU.name and meta["compute_capability"] == "8.6"
    assert meta["profile"]["x"] == {"min": [1, 16], "opt": [32, 16], "max": [32, 16]}
    order = fake_trt.names()
    assert order.index("set_timing_cache") < order.index("build_serialized_network")

    # A second build loads the saved cache, then saves it again (reuse).
    meta2 = build_engine(onnx_path, tmp_path / "m2.plan", options, FAKE_GPU)
    assert fake_trt.args("create_timing_cache")[-1] == b"[timings]"
    assert meta2["timing_cache"]["loaded"] is True
    assert cache.read_bytes() == b"[timings][timings]"


def test_parser_errors_are_listed(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(
        EngineBuildError, match=r"cannot parse .*bad.onnx: node #-1 \(\): cannot read model"
    ):
        build_engine(bad, tmp_path / "x.plan", EngineBuildOptions(), FAKE_GPU)
    assert not (tmp_path / "x.plan").exists()


def test_old_tensorrt_is_refused(fake_trt: FakeTensorRT, tmp_path: Path) -> None:
    fake_trt.module.__version__ = "8.6.1"
    with pytest.raises(GpuUnavailableError, match=r"TensorRT 8.6.1 is too old.*>= 10"):
        build_engine(
            make_tiny_onnx(tmp_path / "t.onnx"), tmp_path / "x.plan", EngineBuildOptions(), FAKE_GPU
        )


def test_gpu_target_builds_and_reuses_plans_with_fake_tensorrt(
    fake_trt: FakeTensorRT, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("builder.gpu.target.check_gpu_available", lambda: None)
    monkeypatch.setattr(device, "gpu_info", lambda index=0: FAKE_GPU)
    options = GpuTargetOptions(compute_capabilities=["9.0"])
    first = build_gpu_target(_manifest(repo), repo, calibration=_calibration(), options=options)
    plans = {r.triton_name: r.status for r in first.results if r.backend == "tensorrt_plan"}
    assert plans == {f"tiny_{p}_trt": "built" for p in ("fp32", "fp16", "int8")}
    assert first.summary_lines()[0] == "GPU: Fake GPU (test) (compute capability 8.6)"

    # Two targets (8.6 built here, 9.0 listed): per-architecture plan names in the config.
    cfg = _parse(repo / "tiny_fp16_trt" / CONFIG_NAME)
    assert dict(cfg.cc_model_filenames) == {"8.6": "model_sm86.plan", "9.0": "model_sm90.plan"}
    assert (repo / "tiny_fp16_trt/1/model_sm86.plan").read_bytes() == b"FAKE-PLAN:x"
    engine = _manifest(repo).variants["fp16"].details["gpu"]["tensorrt_plan"]["engines"]["8.6"]
    assert engine["gpu_name"] == FAKE_GPU.name and engine["tensorrt_version"] == "10.13.0.35"
    assert engine["timing_cache"]["path"] == ".cache/tensorrt/timing_sm86.cache"
    assert (repo / ".cache/tensorrt/timing_sm86.cache").is_file()

    builds = len(fake_trt.args("build_serialized_network"))
    again = build_gpu_target(_manifest(repo), repo, calibration=_calibration(), options=options)
    assert {r.status for r in again.results if r.backend == "tensorrt_plan"} == {"reused"}
    assert len(fake_trt.args("build_serialized_network")) == builds


# ---- the real thing (GPU hosts only) ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(
    check_gpu_available() is not None,
    reason=f"needs a CUDA GPU with TensorRT: {check_gpu_available()}",
)
def test_real_engines_build_and_match_onnxruntime(repo: Path) -> None:
    """Builds real fp32/fp16/int8 plans and compares their outputs with ONNX Runtime on CPU."""
    import onnxruntime as ort

    from builder.gpu.runtime import TensorRTRunner

    result = build_gpu_target(_manifest(repo), repo, calibration=_calibration())
    assert {r.status for r in result.results if r.backend == "tensorrt_plan"} == {"built"}
    x = _calibration(8).inputs["x"]
    ref = ort.InferenceSession(str(repo / "tiny_fp32/1/model.onnx")).run(None, {"x": x})[0]
    for p, tol in (("fp32", 1e-3), ("fp16", 5e-2), ("int8", 0.5)):
        out = TensorRTRunner(repo / f"tiny_{p}_trt/1/model.plan").run({"x": x})["logits"]
        assert out.shape == ref.shape
        assert np.abs(out.astype(np.float32) - ref).max() < tol, p
        assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.75, p


def test_strongly_typed_flag_by_tensorrt_version(fake_trt: FakeTensorRT) -> None:
    from builder.gpu.tensorrt_build import network_flags

    trt = fake_trt.module
    assert network_flags(trt) == 1 << 1  # 10.x: opt in with STRONGLY_TYPED
    del trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    trt.__version__ = "11.4.0.106"
    assert network_flags(trt) == 0  # 11.x: always strongly typed
    trt.__version__ = "10.0.1"
    with pytest.raises(EngineBuildError, match="no strongly typed networks"):
        network_flags(trt)


def test_plan_built_alone_is_renamed_when_a_second_gpu_joins(
    fake_trt: FakeTensorRT, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("builder.gpu.target.check_gpu_available", lambda: None)
    monkeypatch.setattr(device, "gpu_info", lambda index=0: FAKE_GPU)
    opts = GpuTargetOptions(precisions=["fp32"], backends=("tensorrt_plan",))
    build_gpu_target(_manifest(repo), repo, options=opts)
    assert (repo / "tiny_fp32_trt/1/model.plan").is_file()
    other = GpuInfo(0, "Other fake GPU", "9.0", 80 << 30, "12.8")
    monkeypatch.setattr(device, "gpu_info", lambda index=0: other)
    build_gpu_target(_manifest(repo), repo, options=opts)
    plans = sorted(p.name for p in (repo / "tiny_fp32_trt/1").glob("*.plan"))
    assert plans == ["model_sm86.plan", "model_sm90.plan"]
    cfg = _parse(repo / "tiny_fp32_trt" / CONFIG_NAME)
    assert dict(cfg.cc_model_filenames) == {"8.6": "model_sm86.plan", "9.0": "model_sm90.plan"}
    engines = _manifest(repo).variants["fp32"].details["gpu"]["tensorrt_plan"]["engines"]
    assert {cc: e["plan"] for cc, e in engines.items()} == {
        "8.6": "model_sm86.plan",
        "9.0": "model_sm90.plan",
    }
