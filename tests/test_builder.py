"""The builder on the tiny ONNX model: layout, configs, manifest, caching, atomicity, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from builder.errors import BuildError, CalibrationDataError, SourceError
from builder.pipeline import BuildOptions, build_model
from common.model_repository import (
    RepositoryError,
    load_manifest,
    load_manifests,
    parse_config_text,
)
from tests.helpers import make_tiny_onnx

PRECISIONS = ["fp32", "fp16", "int8"]


def _build(onnx_path: Path, repo: Path, **kw) -> object:
    kw.setdefault("precisions", PRECISIONS)
    kw.setdefault("progress", False)
    kw.setdefault("measure_speed", False)
    return build_model(f"onnx:{onnx_path}", BuildOptions(repository=repo, **kw))


def test_repository_layout_configs_and_manifest(tiny_repository: Path) -> None:
    manifest = load_manifests(tiny_repository)["tiny"]
    assert set(manifest.variants) == set(PRECISIONS)
    for precision, v in manifest.variants.items():
        model_dir = tiny_repository / f"tiny_{precision}"
        assert v.triton_name == f"tiny_{precision}"
        assert (model_dir / "1" / "model.onnx").is_file()
        cfg = parse_config_text((model_dir / "config.pbtxt").read_text())
        assert isinstance(cfg, mc.ModelConfig)
        assert cfg.name == v.triton_name
        assert cfg.platform == "onnxruntime_onnx"
        assert cfg.max_batch_size == manifest.max_batch_size > 0
        assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
            ("x", mc.TYPE_FP32, [16])
        ]
        assert [(o.name, o.data_type, list(o.dims)) for o in cfg.output] == [
            ("logits", mc.TYPE_FP32, [4])
        ]
        assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert cfg.HasField("dynamic_batching")
        assert cfg.model_warmup and cfg.model_warmup[0].inputs["x"].zero_data
        assert v.size_bytes == (model_dir / "1" / "model.onnx").stat().st_size
        assert v.quality["top1_agreement"] is not None
        assert manifest.host["cores"] >= 1
    # FP16 halves the weights; (INT8's per-channel scales outweigh this tiny model's weights,
    # so INT8 sizes are checked on real models.)
    sizes = {p: v.size_bytes for p, v in manifest.variants.items()}
    assert sizes["fp16"] < sizes["fp32"]
    int8 = manifest.variants["int8"].details
    assert int8["format"] == "QDQ" and int8["per_channel"] is True
    assert int8["activation_type"] in ("QUInt8", "QInt8") and int8["type_choice"]
    assert int8["lowest_sqnr_layers"], "per-layer drift was not recorded"
    assert (tiny_repository / "tiny.samples.npz").is_file()


def test_every_variant_keeps_the_fp32_interface(tiny_repository: Path) -> None:
    manifest = load_manifests(tiny_repository)["tiny"]
    x = np.random.default_rng(1).normal(size=(5, 16)).astype(np.float32)
    ref = None
    for precision in PRECISIONS:
        sess = ort.InferenceSession(str(tiny_repository / manifest.variants[precision].file))
        assert [(i.name, i.type) for i in sess.get_inputs()] == [("x", "tensor(float)")]
        assert [(o.name, o.type) for o in sess.get_outputs()] == [("logits", "tensor(float)")]
        (out,) = sess.run(None, {"x": x})
        assert out.shape == (5, 4) and out.dtype == np.float32
        if ref is None:
            ref = out
        else:
            assert np.allclose(out, ref, atol=0.5), precision


def test_calibration_is_cached_and_reused(tmp_path: Path, tiny_onnx: Path, monkeypatch) -> None:
    monkeypatch.setenv("PRECISION_SERVE_CACHE", str(tmp_path / "cache"))
    repo = tmp_path / "repo"
    first = _build(tiny_onnx, repo, precisions=["fp32", "int8"])
    assert first.variants["int8"].details["calibration_cache_hit"] is False
    cache_files = list((tmp_path / "cache" / "calibration" / "tiny").glob("*.json"))
    assert len(cache_files) == 1
    assert not (repo / ".cache").exists(), "Triton would take a cache folder for a model"

    import onnxruntime.quantization  # noqa: F401

    q = sys.modules["onnxruntime.quantization.quantize"]

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran again although its cache matched")

    monkeypatch.setattr(q, "create_calibrator", no_calibration)
    second = _build(tiny_onnx, repo, precisions=["fp32", "int8"], force=True)
    assert second.variants["int8"].details["calibration_cache_hit"] is True
    # A different method is a different cache entry (so it calibrates: the patched
    # calibrator proves it tries).
    with pytest.raises(BuildError, match="calibration ran again"):
        _build(tiny_onnx, repo, precisions=["int8"], force=True, calibration_method="entropy")


def test_existing_variants_are_kept_unless_forced(tmp_path: Path, tiny_onnx: Path) -> None:
    repo = tmp_path / "repo"
    _build(tiny_onnx, repo, precisions=["fp32"])
    model_file = repo / "tiny_fp32" / "1" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes())  # same bytes, new inode/mtime marker
    marker = model_file.stat().st_mtime_ns
    _build(tiny_onnx, repo, precisions=["fp32", "fp16"])
    assert model_file.stat().st_mtime_ns == marker
    assert (repo / "tiny_fp16" / "config.pbtxt").is_file()
    _build(tiny_onnx, repo, precisions=["fp32"], force=True)
    assert (repo / "tiny_fp32" / "1" / "model.onnx").stat().st_mtime_ns != marker
    assert set(load_manifest(repo / "tiny.manifest.json").variants) == {"fp32", "fp16"}


def test_failed_build_leaves_nothing_half_written(tmp_path: Path, tiny_onnx: Path, monkeypatch):
    repo = tmp_path / "repo"
    from builder.precisions import fp16

    def boom(self, ctx, out_path):
        out_path.write_bytes(b"partial")
        raise BuildError("simulated failure half-way through fp16")

    monkeypatch.setattr(fp16.FP16, "build", boom)
    with pytest.raises(BuildError, match="simulated"):
        _build(tiny_onnx, repo, precisions=["fp32", "fp16"])
    leftovers = sorted(p.name for p in repo.iterdir())
    # fp32 finished before the failure and was installed whole; fp16 and scratch are gone.
    assert "tiny_fp16" not in leftovers
    assert not [n for n in leftovers if n.startswith(".build")]
    assert not (repo / "tiny.manifest.json").exists()


def test_accuracy_budget_keeps_worst_layers_in_fp32(tmp_path: Path, tiny_onnx: Path) -> None:
    # Calibration data with one huge feature makes the input's INT8 scale coarse, which
    # wrecks the other 15 features: the budget must keep fc1 (which reads x) in FP32.
    rng = np.random.default_rng(0)
    calib = rng.normal(size=(64, 16)).astype(np.float32)
    calib[:, 0] *= 2000.0
    data = tmp_path / "calib"
    data.mkdir()
    np.savez(data / "rows.npz", x=calib)
    repo = tmp_path / "repo"
    loose = _build(tiny_onnx, repo, precisions=["int8"], calibration_data=data)
    loss = loose.variants["int8"].details["accuracy_loss"]
    assert loss > 5.0, f"the outlier calibration should hurt INT8 (loss {loss})"
    # Only keeping both of its layers FP32 meets the budget: that is the FP32 model again, so
    # the variant is not written (tests/test_budget_search.py has a model where one layer is
    # enough) unless --keep-over-budget asks for it.
    opts = {"precisions": ["int8"], "calibration_data": data, "accuracy_budget": 1.0}
    tight = _build(tiny_onnx, repo, force=True, **opts)
    assert "int8" not in tight.variants
    assert any("kept FP32 (no quantization left)" in n for n in tight.notes), tight.notes
    kept = _build(tiny_onnx, repo, force=True, keep_over_budget=True, **opts)
    details = kept.variants["int8"].details
    assert details["budget_met"] is False
    last = details["budget_attempts"][-1]  # the search did find that keeping both meets it
    assert last["kept"] == 2 and last["accuracy_loss"] <= 1.0
    assert details["calibration_data"].startswith("user data")


def test_user_calibration_data_is_checked(tmp_path: Path, tiny_onnx: Path) -> None:
    bad_shape = tmp_path / "shape"
    bad_shape.mkdir()
    np.save(bad_shape / "a.npy", np.zeros((4, 15), np.float32))
    with pytest.raises(CalibrationDataError, match=r"'x'.*expected 16, got 15"):
        _build(tiny_onnx, tmp_path / "r1", calibration_data=bad_shape)
    bad_dtype = tmp_path / "dtype"
    bad_dtype.mkdir()
    np.save(bad_dtype / "a.npy", np.zeros((4, 16), np.int64))
    with pytest.raises(CalibrationDataError, match=r"'x' expected dtype float32, got int64"):
        _build(tiny_onnx, tmp_path / "r2", calibration_data=bad_dtype)
    wrong_name = tmp_path / "name"
    wrong_name.mkdir()
    np.savez(wrong_name / "a.npz", y=np.zeros((4, 16), np.float32))
    with pytest.raises(CalibrationDataError, match="lacks input"):
        _build(tiny_onnx, tmp_path / "r3", calibration_data=wrong_name)
    for r in ("r1", "r2", "r3"):
        assert not any(p.name.startswith("tiny_") for p in (tmp_path / r).iterdir())


def test_unknown_source_and_precision(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="unknown model source 'nope'"):
        build_model("nope", BuildOptions(repository=tmp_path, progress=False))
    make_tiny_onnx(tmp_path / "m.onnx")
    with pytest.raises(BuildError, match="unknown precision 'int3'"):
        build_model(
            f"onnx:{tmp_path / 'm.onnx'}",
            BuildOptions(repository=tmp_path / "r", precisions=["int3"], progress=False),
        )


def test_unwritable_repository(tmp_path: Path, tiny_onnx: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RepositoryError, match="not writable"):
        _build(tiny_onnx, blocker / "repo")


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "builder.cli", *args, "--quiet", "--no-speed"],
        capture_output=True,
        text=True,
        timeout=300,
        env=None if env is None else {**os.environ, **env},
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["nope"], "unknown model source 'nope'"),
        (["onnx:/does/not/exist.onnx"], "/does/not/exist.onnx"),
        (["onnx:{garbage}"], "garbage.onnx"),
        (["onnx:{tiny}", "--repository", "{blocker}/repo"], "not writable"),
        (["onnx:{tiny}", "--precisions", "fp32,int3"], "unknown precision 'int3'"),
    ],
)
def test_cli_bad_input_is_one_line_and_nonzero(tmp_path: Path, tiny_onnx: Path, args, needle):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not protobuf")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    fmt = {"garbage": garbage, "tiny": tiny_onnx, "blocker": blocker}
    argv = [a.format(**fmt) for a in args]
    if "--repository" not in argv:
        argv += ["--repository", str(tmp_path / "repo")]
    res = _cli(*argv)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("precision-build: error:") and needle in lines[0]


def test_cli_builds_and_prints_summary(tmp_path: Path, tiny_onnx: Path) -> None:
    res = _cli(f"onnx:{tiny_onnx}", "--repository", str(tmp_path), "--precisions", "fp32,int8")
    assert res.returncode == 0, res.stderr
    assert "| fp32" in res.stdout and "| int8" in res.stdout
    data = json.loads((tmp_path / "tiny.manifest.json").read_text())
    assert set(data["variants"]) == {"fp32", "int8"}


def test_cli_says_what_int8_was_calibrated_and_judged_on(tmp_path: Path, tiny_onnx: Path) -> None:
    """An onnx: source has no data: the summary and the manifest say INT8 rests on noise."""
    repo = tmp_path / "repo"
    res = _cli(f"onnx:{tiny_onnx}", "--repository", str(repo), "--precisions", "fp32,int8")
    assert res.returncode == 0, res.stderr
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("data: ")]
    assert "synthetic" in line and "calibrated" in line and "quality" in line
    assert "--calibration-data" in line
    notes = json.loads((repo / "tiny.manifest.json").read_text())["notes"]
    assert line in notes

    # With --calibration-data only the quality figures still rest on noise, and it says so.
    data = tmp_path / "calib"
    data.mkdir()
    np.savez(data / "rows.npz", x=np.random.default_rng(0).normal(size=(32, 16)).astype("f4"))
    res = _cli(
        f"onnx:{tiny_onnx}",
        *("--repository", str(repo), "--precisions", "int8", "--calibration-data", str(data)),
    )
    assert res.returncode == 0, res.stderr
    (line,) = [x for x in res.stdout.splitlines() if x.startswith("data: ")]
    assert f"calibrated on user data from {data}" in line
    assert "measured on synthetic data" in line and "--calibration-data" not in line
    notes = json.loads((repo / "tiny.manifest.json").read_text())["notes"]
    assert [n for n in notes if n.startswith("data: ")] == [line]


def test_public_model_zoo_model_converts(tmp_path: Path) -> None:
    """SqueezeNet from the ONNX model zoo (opset 9, Caffe2 export), as shipped in the onnx
    wheel's backend test data (weights replaced by constants). Nobody here wrote it."""
    import onnx

    zoo = Path(onnx.__file__).parent / "backend/test/data/light/light_squeezenet.onnx"
    if not zoo.is_file():
        pytest.skip("this onnx wheel ships no model-zoo test data")
    manifest = build_model(
        f"onnx:{zoo}",
        BuildOptions(
            repository=tmp_path,
            precisions=PRECISIONS,
            progress=False,
            measure_speed=False,
            calibration_samples=8,
        ),
    )
    assert set(manifest.variants) == set(PRECISIONS)
    assert any("opset 9" in n for n in manifest.notes)
    assert manifest.task == "classification"  # output [1, 1000, 1, 1]
    fp32 = manifest.variants["fp32"].size_bytes
    assert manifest.variants["int8"].size_bytes <= 0.35 * fp32
    for v in manifest.variants.values():
        assert v.quality["finite"] == 1.0


def test_cli_gpu_target_without_cuda_is_one_line(tmp_path: Path, tiny_onnx: Path) -> None:
    # On a GPU host too: the builder's process does not see the tensorrt package (a
    # sitecustomize on PYTHONPATH puts None in sys.modules, so find_spec finds nothing)
    hide = tmp_path / "hide-tensorrt"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text('import sys\nsys.modules["tensorrt"] = None\n')
    path = os.pathsep.join(p for p in (str(hide), os.environ.get("PYTHONPATH", "")) if p)
    repo = tmp_path / "repo"
    res = _cli(
        f"onnx:{tiny_onnx}", "--repository", str(repo), "--target", "gpu", env={"PYTHONPATH": path}
    )
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "precision-serve[gpu]" in lines[0], res.stderr
    assert "tensorrt" in lines[0]
    assert not list(repo.glob("tiny_*")), "nothing may be built before the GPU check"


def test_cli_gpu_configs_only(tmp_path: Path, tiny_onnx: Path) -> None:
    res = _cli(
        f"onnx:{tiny_onnx}",
        "--repository",
        str(tmp_path),
        "--precisions",
        "fp32,fp16",
        "--target",
        "gpu",
        "--configs-only",
    )
    assert res.returncode == 0, res.stderr
    cfg = parse_config_text((tmp_path / "tiny_fp16_trt" / "config.pbtxt").read_text())
    assert cfg.platform == "tensorrt_plan"
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert not list(tmp_path.glob("tiny_*_trt/1/*.plan"))
    assert "gpu target:" in res.stdout
