"""A quantization-aware-trained variant (int8-qat) serves through real Triton and the gateway
like any other: the gateway in front of Triton answers what the embedded upstream answers."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from builder.options import BuildOptions
from builder.pipeline import build_model
from server.runtime.runner import GatewayProcess
from tests.triton.conftest import StartTriton

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = textwrap.dedent(
    """
    import torch
    from common.model_repository import TensorSpec

    def tiny():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
        return net, [TensorSpec("x", "float32", [8])]
    """
)


def _infer(url: str, model: str, x: np.ndarray) -> tuple[np.ndarray, str]:
    client = grpcclient.InferenceServerClient(url)
    t = grpcclient.InferInput("x", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    result = client.infer(model, [t], client_timeout=30)
    out = result.as_numpy("output"), result.get_response().parameters["precision"].string_param
    client.close()
    return out


def test_int8_qat_serves_through_triton_like_the_embedded_upstream(
    tmp_path: Path, start_triton: StartTriton, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PRECISION_SERVE_CACHE", str(tmp_path / "cache"))
    factory = tmp_path / "tiny_qat.py"
    factory.write_text(TINY)
    repo = tmp_path / "repo"
    manifest = build_model(
        f"torch:{factory}:tiny",
        BuildOptions(
            repository=repo,
            precisions=["fp32", "int8-qat"],
            measure_speed=False,
            progress=False,
            extra={"qat": {"steps": 10, "mode": "static"}},
        ),
    )
    record = manifest.variants["int8-qat"]
    assert record.details["qat"]["steps"] == 10
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    triton = start_triton(repo)
    with (
        GatewayProcess(repo, extra_args=["--upstream", f"triton://{triton.grpc_url}"]) as via,
        GatewayProcess(repo, extra_args=["--upstream", "embedded?threads=1"]) as embedded,
    ):
        got, served = _infer(via.grpc_url, record.triton_name, x)
        want, _ = _infer(embedded.grpc_url, record.triton_name, x)
    assert served == "int8-qat"
    assert got.shape == (4, 4)
    np.testing.assert_array_equal(got, want)
    stats = grpcclient.InferenceServerClient(triton.grpc_url).get_inference_statistics()
    counts = {s.name: s.inference_stats.success.count for s in stats.model_stats}
    assert counts[record.triton_name] >= 1
