"""The derived python-backend repository and the python model, without starting Triton."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import model_config_pb2 as mc

from common.model_repository import load_manifests, read_config
from server.launcher import python_model
from server.launcher.cli import main as triton_main
from server.launcher.derive import derive_repository
from server.launcher.distribution import find_distribution
from server.launcher.errors import TritonNotInstalled, TritonRepositoryError
from server.launcher.tritonserver import TritonOptions


def _snapshot(repo: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*")) if p.is_file()
    }


def test_derived_config_is_the_standard_one_on_the_python_backend(
    tiny_repository: Path, tmp_path: Path
) -> None:
    before = _snapshot(tiny_repository)
    target = tmp_path / "derived"
    derived = derive_repository(tiny_repository, target, threads=2)
    manifest = next(iter(load_manifests(tiny_repository).values()))
    assert sorted(d.name for d in derived) == sorted(
        v.triton_name for v in manifest.variants.values()
    )
    for record in manifest.variants.values():
        standard = read_config(tiny_repository / record.triton_name)
        assert standard.platform == "onnxruntime_onnx"
        got = read_config(target / record.triton_name)
        assert got.backend == "python" and not got.platform
        params = {k: v.string_value for k, v in got.parameters.items()}
        assert params[python_model.PARAM_ENGINE] == record.engine
        assert json.loads(params[python_model.PARAM_ENGINE_OPTIONS]) == record.engine_options
        assert (
            Path(params[python_model.PARAM_MODEL_FILE]) == (tiny_repository / record.file).resolve()
        )
        assert params[python_model.PARAM_THREADS] == "2"
        # Everything else - name, inputs, outputs, batching, instances, warm-up - is unchanged.
        expected = mc.ModelConfig()
        expected.CopyFrom(standard)
        expected.ClearField("platform")
        expected.backend = "python"
        for key, value in got.parameters.items():
            expected.parameters[key].CopyFrom(value)
        assert got == expected
        assert got.dynamic_batching == standard.dynamic_batching
        assert got.max_batch_size == standard.max_batch_size > 0
        model_py = target / record.triton_name / "1" / "model.py"
        assert model_py.read_bytes() == Path(python_model.__file__).read_bytes()
    assert _snapshot(tiny_repository) == before  # the standard repository is never touched


def test_derive_rejects_a_repository_without_manifests(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(TritonRepositoryError, match=r"no \*\.manifest\.json"):
        derive_repository(tmp_path / "empty", tmp_path / "out")


def test_derive_never_deletes_a_folder_it_did_not_write(
    tiny_repository: Path, tmp_path: Path
) -> None:
    for target in (tiny_repository, tiny_repository / "sub", tiny_repository.parent):
        with pytest.raises(TritonRepositoryError, match="outside the model repository"):
            derive_repository(tiny_repository, target)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(TritonRepositoryError, match="not empty"):
        derive_repository(tiny_repository, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    derive_repository(tiny_repository, tmp_path / "derived")
    derive_repository(tiny_repository, tmp_path / "derived")  # its own output: replaced


def test_merge_and_split_round_trip() -> None:
    rng = np.random.default_rng(0)
    a = {"x": rng.normal(size=(2, 3)).astype(np.float32)}
    b = {"x": rng.normal(size=(1, 3)).astype(np.float32)}
    c = {"x": rng.normal(size=(4, 5)).astype(np.float32)}  # another inner shape
    groups = python_model.group_compatible([a, b, c])
    assert groups == [[0, 1], [2]]
    merged, rows = python_model.merge_feeds([a, b])
    assert rows == [2, 1] and merged["x"].shape == (3, 3)
    back = python_model.split_outputs({"y": merged["x"] * 2}, rows)
    np.testing.assert_array_equal(back[0]["y"], a["x"] * 2)
    np.testing.assert_array_equal(back[1]["y"], b["x"] * 2)


class _FakePbUtils(types.ModuleType):
    """Just enough of triton_python_backend_utils to drive TritonPythonModel.execute."""

    class Tensor:
        def __init__(self, name: str, array: np.ndarray) -> None:
            self.name, self.array = name, array

        def as_numpy(self) -> np.ndarray:
            return self.array

    class TritonError:
        def __init__(self, message: str) -> None:
            self.message = message

    class InferenceResponse:
        def __init__(self, output_tensors: list, error: object = None) -> None:
            self.output_tensors, self.error = output_tensors, error

    @staticmethod
    def get_input_tensor_by_name(request: dict, name: str) -> object:
        return request.get(name)


def test_python_model_batches_compatible_requests_and_isolates_bad_ones(
    tiny_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pb = _FakePbUtils("triton_python_backend_utils")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    derive_repository(tiny_repository, tmp_path / "derived")
    name = next(iter(load_manifests(tiny_repository).values())).variants["fp32"].triton_name
    config = read_config(tmp_path / "derived" / name)
    from google.protobuf import json_format

    model = python_model.TritonPythonModel()
    model.initialize(
        {
            "model_config": json.dumps(
                json_format.MessageToDict(config, preserving_proto_field_name=True)
            )
        }
    )
    calls: list[int] = []
    run = model._session.run
    model._session.run = lambda feeds: calls.append(len(feeds["x"])) or run(feeds)  # type: ignore[method-assign]
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(n, 16)).astype(np.float32) for n in (1, 3, 2)]
    requests = [
        {"x": pb.Tensor("x", xs[0])},
        {},
        {"x": pb.Tensor("x", xs[1])},
        {"x": pb.Tensor("x", xs[2])},
    ]
    responses = model.execute(requests)
    assert calls == [6]  # the three valid requests ran as one batch
    assert responses[1].error is not None and "input 'x' is missing" in responses[1].error.message
    for response, x in zip([responses[0], responses[2], responses[3]], xs, strict=True):
        assert response.error is None
        (tensor,) = response.output_tensors
        np.testing.assert_array_equal(tensor.as_numpy(), run({"x": x})["logits"])


def test_options_and_distribution_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="model_control"):
        TritonOptions(repository=Path("r"), model_control="poll")
    with pytest.raises(ValueError, match="grpc_port"):
        TritonOptions(repository=Path("r"), grpc_port=70000)
    with pytest.raises(TritonNotInstalled, match=r"2\.7"):
        find_distribution(python_version="2.7")


def test_cli_prints_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert triton_main(["start", "--repository", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and err[0].startswith("precision-serve triton")


def test_cli_derive(tiny_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert (
        triton_main(
            ["derive", "--repository", str(tiny_repository), "--output", str(tmp_path / "d")]
        )
        == 0
    )
    assert "derived 3 python-backend models" in capsys.readouterr().out
