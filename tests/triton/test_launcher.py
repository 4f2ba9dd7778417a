"""A real tritonserver (nvidia-pytriton wheel) on the tiny repository, without the gateway."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from common import process
from common.engines import get_engine
from common.model_repository import load_manifests
from common.process import wait_ready
from server.launcher.errors import TritonStartError
from tests.triton.conftest import StartTriton

pytestmark = pytest.mark.integration


def _infer(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    tensor = grpcclient.InferInput("x", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return client.infer(model, [tensor]).as_numpy("logits")


def _group_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_triton_serves_each_variant_exactly_like_the_engine(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    server = start_triton(tiny_repository)
    manifest = next(iter(load_manifests(tiny_repository).values()))
    client = grpcclient.InferenceServerClient(server.grpc_url)
    x = np.random.default_rng(3).normal(size=(5, 16)).astype(np.float32)
    for record in manifest.variants.values():
        config = client.get_model_config(record.triton_name).config
        assert config.backend == "python" and config.max_batch_size == manifest.max_batch_size
        session = get_engine(record.engine).load(
            tiny_repository / record.file, record.engine_options, 1
        )
        np.testing.assert_array_equal(
            _infer(client, record.triton_name, x), session.run({"x": x})["logits"]
        )
    # Triton's own metrics stay reachable for Prometheus.
    text = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    assert "nv_inference_request_success" in text
    client.close()
    pid = server.pid
    assert pid is not None
    assert server.stop() == 0  # graceful: SIGTERM, exit 0
    assert _group_gone(pid)  # no python-backend stub left behind
    assert (
        server.log_file is not None
        and "Started GRPCInferenceService" in server.log_file.read_text()
    )


def test_a_model_that_cannot_load_fails_start_up_with_its_log(
    tiny_repository: Path, tmp_path: Path, start_triton: StartTriton
) -> None:
    repo = shutil.copytree(tiny_repository, tmp_path / "broken")
    manifest = next(iter(load_manifests(repo).values()))
    (repo / manifest.variants["int8"].file).write_bytes(b"not an onnx file")
    with pytest.raises(TritonStartError) as info:
        start_triton(repo)
    first_line = str(info.value).splitlines()[0]
    assert "exited" in first_line and "failed to load" in first_line
    assert manifest.variants["int8"].triton_name in first_line


def test_cli_start_writes_ready_file_and_stops_on_sigterm(
    tiny_repository: Path, tmp_path: Path, triton_distribution: object
) -> None:
    ready_file = tmp_path / "ready.json"
    cmd = [
        sys.executable,
        "-m",
        "server.launcher",
        "start",
        "--repository",
        str(tiny_repository),
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "0",
        "--model-control",
        "explicit",
        "--log-file",
        str(tmp_path / "triton.log"),
        "--ready-file",
        str(ready_file),
    ]
    proc = process.start(cmd, log_path=tmp_path / "cli.out")
    try:
        what = "the triton CLI's ready file"
        wait_ready(ready_file.exists, 90, what, proc=proc, log=tmp_path / "cli.out")
        ports = json.loads(ready_file.read_text())
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc_port']}")
        name = next(iter(load_manifests(tiny_repository).values())).variants["fp32"].triton_name
        assert _infer(client, name, np.zeros((1, 16), np.float32)).shape == (1, 4)
        client.unload_model(name)  # explicit model control
        wait_ready(lambda: not client.is_model_ready(name), 10, f"{name} unloaded")
        client.close()
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - started < 30
        assert _group_gone(ports["tritonserver_pid"])
    finally:
        process.stop(proc)
    assert "tritonserver ready" in (tmp_path / "cli.out").read_text()


def test_a_taken_port_fails_start_up_naming_it(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    # The metrics service starts last, after gRPC already answers ready: the launcher must not
    # report a server that is about to exit as started.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(TritonStartError) as info:
            start_triton(tiny_repository, metrics_port=port)
    first_line = str(info.value).splitlines()[0]
    assert f"'127.0.0.1:{port}' already in use" in first_line and "Metrics" in first_line
