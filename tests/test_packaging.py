"""The wheel holds the product and nothing else: the four product packages, never the lab
(measurement floors, soak and ramp drivers), the benchmark or the tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = {"common", "builder", "server", "loadtest"}
# what a wheel build never needs (and what may be large in a working tree)
SKIP = {".git", ".venv", ".cache", "model_repository", "reports", "build", "dist"}


def test_the_wheel_holds_the_product_packages_and_no_lab(tmp_path: Path) -> None:
    src = tmp_path / "src"
    cache = shutil.ignore_patterns("__pycache__", "*.egg-info")

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = SKIP if Path(folder) == ROOT else set()
        return set(cache(folder, names)) | (top & set(names))

    shutil.copytree(ROOT, src, ignore=ignore)
    assert (src / "lab").is_dir() and (src / "bench").is_dir()  # there to be left out
    out = tmp_path / "wheel"
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run(
        [*pip, "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("precision_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == PRODUCT, sorted(tops)
    assert "server/dataplane/gateway.py" in names and "common/model_repository/manifest.py" in names
    assert not [n for n in names if n.startswith(("lab/", "bench/", "tests/"))]
