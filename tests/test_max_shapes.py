"""``--max-shape`` and the Hugging Face sources' sequence bound (builder/max_shapes.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from builder.errors import BuildError
from builder.max_shapes import apply_max_shapes, parse_max_shapes
from builder.sources.hf_folder import _bounded
from common.model_repository import TensorSpec
from tests.helpers import make_sequence_onnx

ROOT = Path(__file__).resolve().parents[1]


def test_parse_max_shapes():
    assert parse_max_shapes(["ids=512", "image=3x224X224"]) == {
        "ids": [512],
        "image": [3, 224, 224],
    }
    for bad in ("ids", "ids=", "=5", "ids=5xq"):
        with pytest.raises(BuildError, match=f"--max-shape '{bad}': expected NAME=D1xD2"):
            parse_max_shapes([bad])


def test_apply_max_shapes_checks_names_and_shapes():
    inputs = [TensorSpec("ids", "int64", [-1]), TensorSpec("x", "float32", [4])]
    out = apply_max_shapes(inputs, {"ids": [512]})
    assert out[0].max_shape == [512] and out[1].max_shape is None
    with pytest.raises(BuildError, match=r"no input named \['idz'\] \(inputs: \['ids', 'x'\]\)"):
        apply_max_shapes(inputs, {"idz": [5]})
    with pytest.raises(BuildError, match="max_shape dim 0 is 5, expected 4, as in shape"):
        apply_max_shapes(inputs, {"x": [5]})


def test_hf_sequences_are_bounded_by_the_position_embeddings():
    inputs = [TensorSpec("input_ids", "int64", [-1]), TensorSpec("pixel", "float32", [3])]
    out = _bounded(inputs, SimpleNamespace(max_position_embeddings=512))
    assert [s.max_shape for s in out] == [[512], None]
    assert _bounded(inputs, SimpleNamespace()) == inputs  # no such limit in the config


def test_cli_bad_max_shape_is_one_line(tmp_path: Path):
    onnx_path = make_sequence_onnx(tmp_path / "seq.onnx")
    cmd = [sys.executable, "-m", "builder.cli", f"onnx:{onnx_path}", "--quiet"]
    cmd += ["--repository", str(tmp_path / "repo"), "--max-shape", "ids=5x5"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [
        "precision-build: error: --max-shape: tensor 'ids': max_shape [5, 5] has 2 dims, "
        "shape [-1] has 1"
    ]
    assert not (tmp_path / "repo" / "seq.manifest.json").exists()
