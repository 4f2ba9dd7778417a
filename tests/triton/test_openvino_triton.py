"""OpenVINO-run variants (fp32 on openvino, bf16) served by the locally launched Triton: the
python backend runs the engine the manifest names, with its options, and answers exactly as the
engine does in-process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from builder import hostinfo
from builder.pipeline import BuildOptions, build_model
from common.engines import get_engine
from common.model_repository import load_manifests, read_config
from tests.helpers import skip_or_fail
from tests.triton.conftest import StartTriton

pytestmark = pytest.mark.integration


def test_triton_runs_openvino_variants_like_the_engine(
    tiny_onnx: Path, tmp_path: Path, start_triton: StartTriton, monkeypatch: pytest.MonkeyPatch
) -> None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        skip_or_fail("openvino is not installed")
    repo = tmp_path / "repo"
    if not hostinfo.supports_bf16():  # build the bf16 variant anyway (OpenVINO stays f32 here)
        real = hostinfo.cpu_info()
        fake = {**real, "flags": [*real["flags"], "amx_bf16"]}  # type: ignore[list-item]
        monkeypatch.setattr(hostinfo, "cpu_info", lambda: fake)
    build_model(
        f"onnx:{tiny_onnx}",
        BuildOptions(
            repository=repo,
            precisions=["fp32", "bf16"],
            engine="openvino",
            progress=False,
            measure_speed=False,
        ),
    )
    manifest = load_manifests(repo)["tiny"]
    assert {v.engine for v in manifest.variants.values()} == {"openvino"}
    assert read_config(repo / "tiny_bf16").parameters["HINT_BF16"].string_value == "YES"

    server = start_triton(repo)
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = np.random.default_rng(5).normal(size=(6, 16)).astype(np.float32)
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    for record in manifest.variants.values():
        params = client.get_model_config(record.triton_name).config.parameters
        assert params["precision_serve_engine"].string_value == "openvino"
        got = client.infer(record.triton_name, [tensor]).as_numpy("logits")
        session = get_engine(record.engine).load(repo / record.file, record.engine_options, 1)
        np.testing.assert_allclose(got, session.run({"x": x})["logits"], rtol=1e-6, atol=1e-6)
    client.close()
