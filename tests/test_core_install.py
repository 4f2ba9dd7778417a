"""The core install (no extras) is a working gateway: a fresh venv serves a built repository.

Creates a venv and ``pip install``s a copy of the project into it without extras (from pip's
cache where it can; like ``make install`` it needs the package index or a warm cache), checks the
build stack is absent there, starts that venv's ``precision-serve`` console script on the
``tiny_repository`` fixture and infers over gRPC from this process. An ``engine: openvino``
variant (what the builder records when OpenVINO measured faster) is reported unready with its
reason there, since the core has no OpenVINO, and the model still serves from another precision.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from common import process

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
# What the Dockerfile copies: packaging and the four packages.
PROJECT_FILES = ("pyproject.toml", "README.md", "common", "builder", "server", "loadtest")
# The build stack, the tests' HTTP client and the load tester: none of them is a core dependency.
ABSENT = ("onnx", "onnxconverter_common", "torch", "tqdm", "transformers", "gevent", "openvino")


def _clean_env() -> dict[str, str]:
    """This environment without anything that would make the venv see this checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def core_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv holding only ``pip install <project>`` (no extras); returns its bin directory."""
    base = tmp_path_factory.mktemp("core_install")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in PROJECT_FILES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    venv = base / "venv"
    # No pip inside: this interpreter's pip installs into it (--python), which skips bootstrapping
    # pip and, with --no-compile, byte-compiling every dependency (~25 s instead of ~150 s here).
    done = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base, 120)
    assert done.returncode == 0, done.stderr
    bin_dir = venv / "bin"
    pip = [sys.executable, "-m", "pip", "--python", str(bin_dir / "python")]
    done = _run([*pip, "install", "-q", "--no-compile", str(src)], base, 900)
    assert done.returncode == 0, f"core install failed:\n{done.stdout}\n{done.stderr}"
    return bin_dir


def test_core_install_lacks_the_build_stack(core_venv: Path, tmp_path: Path) -> None:
    python = str(core_venv / "python")
    for module in ABSENT:
        done = _run([python, "-c", f"import {module}"], tmp_path, 60)
        assert done.returncode != 0, f"{module} is importable in the core install"
        assert "ModuleNotFoundError" in done.stderr, done.stderr
    # ... while the gateway's own imports are all there.
    done = _run([python, "-c", "import server.cli, server.app, tritonclient.grpc"], tmp_path, 120)
    assert done.returncode == 0, done.stderr


def test_core_install_build_says_which_extra(
    core_venv: Path, tiny_onnx: Path, tmp_path: Path
) -> None:
    cmd = [str(core_venv / "precision-build"), f"onnx:{tiny_onnx}", "--repository", str(tmp_path)]
    done = _run(cmd, tmp_path, 120)
    assert done.returncode == 2, done.stderr
    assert "precision-serve[build]" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())


def _openvino_variant_copy(repository: Path, dest: Path) -> Path:
    """The repository with its fp16 variant recorded as an OpenVINO variant."""
    shutil.copytree(repository, dest)
    manifest_path = dest / "tiny.manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["variants"]["fp16"]["engine"] = "openvino"
    manifest["variants"]["fp16"]["engine_options"] = {"inference_precision": "f32"}
    manifest_path.write_text(json.dumps(manifest, indent=2))
    return dest


def test_core_install_serves_a_repository(
    core_venv: Path, tiny_repository: Path, tmp_path: Path
) -> None:
    repository = _openvino_variant_copy(tiny_repository, tmp_path / "repository")
    ready_file = tmp_path / "ready.json"
    log_path = tmp_path / "gateway.log"
    cmd = [
        str(core_venv / "precision-serve"),
        "--repository",
        str(repository),
        "--host",
        "127.0.0.1",
        "--grpc-port",
        "0",
        "--http-port",
        "0",
        "--metrics-port",
        "0",
        "--ready-file",
        str(ready_file),
    ]
    proc = process.start(cmd, log_path=log_path, env=_clean_env(), cwd=tmp_path)
    try:

        def ready() -> bool:
            return ready_file.exists() and bool(ready_file.read_text())

        process.wait_ready(
            ready, 120, "the core install's gateway to write its ready file", proc=proc,
            log=log_path,
        )  # fmt: skip
        ports = json.loads(ready_file.read_text())
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports['grpc_port']}")
        process.wait_ready(client.is_server_ready, 60, "the core install's gateway", proc=proc)

        x = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer("tiny_fp32", [inp])
        logits = result.as_numpy("logits")
        assert logits is not None and logits.shape == (3, 4)
        assert np.all(np.isfinite(logits))
        result = client.infer("tiny", [inp])  # the logical model routes to a ready variant
        assert result.as_numpy("logits").shape == (3, 4)

        # The OpenVINO variant is unready, with a reason that names the missing engine.
        assert not client.is_model_ready("tiny_fp16")
        index = {m.name: m for m in client.get_model_repository_index().models}
        assert index["tiny_fp16"].state == "UNAVAILABLE"
        assert "openvino" in index["tiny_fp16"].reason
        assert "not installed" in index["tiny_fp16"].reason
        assert index["tiny_fp32"].state == "READY"
        client.close()
    finally:
        process.stop(proc, grace=15)
    assert proc.returncode is not None
    log_text = log_path.read_text(errors="replace")
    assert "tiny_fp16 is not servable" in log_text, log_text[-2000:]
