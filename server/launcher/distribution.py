"""Locate the ``tritonserver`` binary, its libraries and its python backend.

The ``nvidia-pytriton`` wheel ships a CPU-capable Triton (no onnxruntime backend, but the python
backend): ``pytriton/tritonserver/bin/tritonserver``, the backend in
``pytriton/tritonserver/backends/python/``, one python-backend stub per Python version in
``pytriton/tritonserver/python_backend_stubs/<X.Y>/`` and the shared libraries in
``nvidia_pytriton.libs`` next to the package. The stub embeds the system's ``libpython3.X``.
Nothing here imports ``pytriton`` itself (it pulls in heavy modules); only its location is read.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from server.launcher.errors import TritonNotInstalled

STUB_NAME = "triton_python_backend_stub"
BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


@dataclass(frozen=True)
class TritonDistribution:
    binary: Path
    libs_dir: Path  # shared libraries the binary and the stub link against (LD_LIBRARY_PATH)
    python_backend_dir: Path  # libtriton_python.so + triton_python_backend_utils.py
    stub: Path  # the python-backend stub for this interpreter's Python version

    def prepare_backends(self, target: Path) -> Path:
        """Lay out ``target/python/`` for Triton's ``--backend-directory``; returns target."""
        backend = Path(target) / "python"
        backend.mkdir(parents=True, exist_ok=True)
        for name in BACKEND_FILES:
            _install(self.python_backend_dir / name, backend / name)
        _install(self.stub, backend / STUB_NAME)
        return Path(target)


def _install(source: Path, target: Path) -> None:
    """Copy beside ``target``, then rename over it: a stub still running from a killed Triton
    keeps its old inode (copying onto a running executable fails with ETXTBSY, which stopped
    the soak's replica restart)."""
    partial = target.with_name(f".{target.name}.partial")
    shutil.copy2(source, partial)
    os.replace(partial, target)


def find_distribution(python_version: str | None = None) -> TritonDistribution:
    """The Triton shipped in the installed ``nvidia-pytriton`` wheel, or TritonNotInstalled."""
    version = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotInstalled(
            "tritonserver not found: install the [triton] extra (the nvidia-pytriton wheel)"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    root = package / "tritonserver"
    dist = TritonDistribution(
        binary=root / "bin" / "tritonserver",
        libs_dir=package.parent / "nvidia_pytriton.libs",
        python_backend_dir=root / "backends" / "python",
        stub=root / "python_backend_stubs" / version / STUB_NAME,
    )
    for path in (
        dist.binary,
        dist.libs_dir,
        dist.stub,
        *(dist.python_backend_dir / n for n in BACKEND_FILES),
    ):
        if not path.exists():
            raise TritonNotInstalled(f"the nvidia-pytriton wheel at {package} lacks {path}")
    return dist
