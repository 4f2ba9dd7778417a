"""Model sources: registry, onnx:/torch:/hf: sources and the demo models."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from builder.errors import SourceError
from builder.sources import DEMO_SOURCES, PREFIX_SOURCES, load_model, resolve
from builder.sources.common import sanitize_name, synthetic_dataset
from common.model_repository import TensorSpec
from tests.helpers import make_tiny_onnx


def _run(onnx_path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


# ---- registry ------------------------------------------------------------------------------


def _has_what_it_declares(source: object) -> None:
    caps = source.capabilities  # type: ignore[attr-defined]
    assert caps.onnx or caps.decoder_llm
    if caps.onnx:
        assert callable(source.load)  # type: ignore[attr-defined]
    if caps.decoder_llm:
        assert callable(source.load_llm)  # type: ignore[attr-defined]
        assert callable(source.is_decoder_llm)  # type: ignore[attr-defined]


def test_registry_resolves_every_source_class() -> None:
    for name in DEMO_SOURCES:
        source, reference = resolve(name)
        assert reference == name
        _has_what_it_declares(source)
    for prefix in PREFIX_SOURCES:
        source, reference = resolve(f"{prefix}:some/thing")
        assert reference == "some/thing"
        _has_what_it_declares(source)


def test_unknown_source_names_the_choices() -> None:
    with pytest.raises(SourceError, match=r"unknown model source 'mnist'.*digits.*onnx:"):
        resolve("mnist")


def test_source_modules_do_not_import_heavy_packages() -> None:
    code = (
        "import sys\n"
        "import builder.sources.onnx_file, builder.sources.torch_module\n"
        "import builder.sources.hf_folder, builder.sources.demos.digits\n"
        "import builder.sources.demos.minilm, builder.sources.demos.resnet50\n"
        "import builder.sources.demos.smollm2, builder.sources.causal_lm, builder.llm.pipeline\n"
        "print(sorted(m for m in ('torch', 'transformers', 'sklearn') if m in sys.modules))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_sanitize_name() -> None:
    assert sanitize_name("ResNet-50.v1 (final)") == "resnet_50_v1_final"
    assert sanitize_name("...") == "model"


def test_synthetic_data_follows_specs() -> None:
    specs = [
        TensorSpec("pixel_values", "float32", [3, 8, 8]),
        TensorSpec("x", "float32", [4]),
        TensorSpec("input_ids", "int64", [-1]),
        TensorSpec("attention_mask", "int64", [-1]),
    ]
    a = synthetic_dataset(specs, 5, seed=3)
    b = synthetic_dataset(specs, 5, seed=3)
    assert len(a) == 5
    assert a.inputs["pixel_values"].shape == (5, 3, 8, 8)
    assert a.inputs["pixel_values"].min() >= 0.0 and a.inputs["pixel_values"].max() < 1.0
    assert a.inputs["x"].min() < 0.0  # N(0, 1), not an image
    assert a.inputs["input_ids"].dtype == np.int64 and a.inputs["input_ids"].shape == (5, 16)
    assert (a.inputs["attention_mask"] == 1).all()
    for k in a.inputs:
        np.testing.assert_array_equal(a.inputs[k], b.inputs[k])


# ---- onnx: ---------------------------------------------------------------------------------


def test_onnx_source_specs_and_data(tmp_path: Path) -> None:
    path = make_tiny_onnx(tmp_path / "Tiny-Model.onnx")
    model = load_model(f"onnx:{path}", tmp_path / "work")
    assert model.name == "tiny_model"
    assert model.source == f"onnx:{path}"
    assert model.task == "classification"
    assert model.fp32_onnx == path  # a current opset is used as it is
    assert model.inputs == [TensorSpec("x", "float32", [16])]
    assert model.outputs == [TensorSpec("logits", "float32", [4])]
    assert model.max_batch_size > 0
    assert model.calibration.inputs["x"].shape[1:] == (16,)
    assert model.evaluation.inputs["x"].dtype == np.float32
    assert model.evaluation.labels is None
    assert not np.array_equal(model.calibration.inputs["x"], model.evaluation.inputs["x"][:64])
    assert any("synthetic" in n and "--calibration-data" in n for n in model.notes)
    (logits,) = _run(model.fp32_onnx, model.evaluation.take(8).inputs)
    assert logits.shape == (8, 4)


def test_onnx_source_upgrades_old_opset(tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(make_tiny_onnx(tmp_path / "tiny.onnx")))
    proto.opset_import[0].version = 11
    proto.ir_version = 6
    old = tmp_path / "old.onnx"
    onnx.save(proto, str(old))
    model = load_model(f"onnx:{old}", tmp_path / "work")
    assert model.fp32_onnx.parent == tmp_path / "work"
    upgraded = onnx.load(str(model.fp32_onnx))
    assert {o.version for o in upgraded.opset_import if o.domain in ("", "ai.onnx")} == {13}
    assert any("opset 11" in n for n in model.notes)
    (logits,) = _run(model.fp32_onnx, model.evaluation.take(2).inputs)
    (reference,) = _run(old, model.evaluation.take(2).inputs)
    np.testing.assert_allclose(logits, reference, rtol=1e-5)


def test_onnx_source_fixed_batch_means_no_batching(tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(make_tiny_onnx(tmp_path / "tiny.onnx")))
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1
    fixed = tmp_path / "fixed.onnx"
    onnx.save(proto, str(fixed))
    model = load_model(f"onnx:{fixed}", tmp_path / "work")
    assert model.max_batch_size == 0
    assert model.inputs == [TensorSpec("x", "float32", [1, 16])]
    assert model.task == "classification"
    (first,) = model.evaluation.batches(1).__next__().values()
    assert first.shape == (1, 16)


def test_onnx_source_rejects_garbage_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"definitely not a protobuf \x00\xff\x13")
    with pytest.raises(SourceError, match=r"garbage\.onnx"):
        load_model(f"onnx:{garbage}", tmp_path / "work")
    with pytest.raises(SourceError, match=r"missing\.onnx does not exist"):
        load_model(f"onnx:{tmp_path / 'missing.onnx'}", tmp_path / "work")


def test_onnx_source_rejects_inputs_without_shape(tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(make_tiny_onnx(tmp_path / "tiny.onnx")))
    proto.graph.input[0].type.tensor_type.ClearField("shape")
    shapeless = tmp_path / "shapeless.onnx"
    onnx.save(proto, str(shapeless))
    with pytest.raises(SourceError, match=r"shapeless\.onnx.*shape"):
        load_model(f"onnx:{shapeless}", tmp_path / "work")


def test_onnx_source_rejects_an_invalid_graph(tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(make_tiny_onnx(tmp_path / "tiny.onnx")))
    proto.graph.node[0].input[1] = "no_such_weight"
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, str(broken))
    with pytest.raises(SourceError, match=r"invalid ONNX file .*broken\.onnx.*no_such_weight"):
        load_model(f"onnx:{broken}", tmp_path / "work")


# ---- torch: --------------------------------------------------------------------------------

FACTORY_FILE = textwrap.dedent(
    """
    import torch
    from common.model_repository import TensorSpec
    from builder.sources.torch_module import TorchModelSpec

    def classifier():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
        return net, [TensorSpec("features", "float32", [6])]

    class Pool(torch.nn.Module):
        def forward(self, tokens, scale):
            return tokens.float().mean(dim=1, keepdim=True) * scale

    def pooled():
        return TorchModelSpec(
            Pool(),
            [TensorSpec("tokens", "int64", [-1]), TensorSpec("scale", "float32", [1])],
            output_names=["pooled"],
            task="embedding",
        )

    def wrong():
        return "not a model"

    not_callable = 3
    """
)


@pytest.fixture()
def factory_file(tmp_path: Path) -> Path:
    path = tmp_path / "user_models.py"
    path.write_text(FACTORY_FILE)
    return path


def test_torch_source_exports_a_tuple_factory(factory_file: Path, tmp_path: Path) -> None:
    model = load_model(f"torch:{factory_file}:classifier", tmp_path / "work")
    assert model.name == "classifier"
    assert model.fp32_onnx == tmp_path / "work" / "classifier.onnx"
    assert model.task == "classification"
    assert model.inputs == [TensorSpec("features", "float32", [6])]
    assert model.outputs == [TensorSpec("output", "float32", [3])]
    assert any("synthetic" in n for n in model.notes)
    (out,) = _run(model.fp32_onnx, model.calibration.take(5).inputs)  # dynamic batch
    assert out.shape == (5, 3)


def test_torch_source_spec_with_dynamic_sequence(factory_file: Path, tmp_path: Path) -> None:
    model = load_model(f"torch:{factory_file}:pooled", tmp_path / "work")
    assert model.task == "embedding"
    assert model.inputs[0] == TensorSpec("tokens", "int64", [-1])
    assert model.outputs == [TensorSpec("pooled", "float32", [1])]
    tokens = np.arange(3 * 7, dtype=np.int64).reshape(3, 7)
    scale = np.full((3, 1), 2.0, dtype=np.float32)
    (out,) = _run(model.fp32_onnx, {"tokens": tokens, "scale": scale})
    np.testing.assert_allclose(out[:, 0], tokens.mean(axis=1) * 2.0, rtol=1e-6)


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("wrong", r"must return a TorchModelSpec.*got str"),
        ("absent", r"has no attribute 'absent'"),
        ("not_callable", r"not_callable is not callable"),
    ],
)
def test_torch_source_bad_factories(
    factory_file: Path, tmp_path: Path, factory: str, message: str
) -> None:
    with pytest.raises(SourceError, match=message):
        load_model(f"torch:{factory_file}:{factory}", tmp_path / "work")


def test_torch_source_bad_references(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="cannot import torch module 'no_such_module_xyz'"):
        load_model("torch:no_such_module_xyz:make", tmp_path)
    with pytest.raises(SourceError, match=r"nope\.py does not exist"):
        load_model(f"torch:{tmp_path / 'nope.py'}:make", tmp_path)
    with pytest.raises(SourceError, match="torch:MODULE:FACTORY"):
        load_model("torch:just_a_module", tmp_path)


# ---- hf: and the demos (slow) ----------------------------------------------------------------


def test_hf_source_rejects_a_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not a Hugging Face model folder"):
        load_model(f"hf:{tmp_path}", tmp_path / "work")


def test_doc_sentences_are_disjoint_and_deterministic() -> None:
    from builder.sources.hf_folder import doc_sentences, split_sentences, training_sentences

    calibration, evaluation = split_sentences()
    assert (len(calibration), len(evaluation)) == (256, 200)
    assert not set(calibration) & set(evaluation)
    assert all(s[0].isupper() and s.endswith(".") for s in calibration + evaluation)
    assert split_sentences() == (calibration, evaluation)
    # The rest is QAT's extra training text: never an evaluation sentence.
    training = training_sentences()
    assert len(training) == len(doc_sentences()) - 456 > 0
    assert not set(training) & set(evaluation) and not set(training) & set(calibration)


@pytest.mark.slow
def test_hf_source_exports_minilm_embeddings(tmp_path: Path) -> None:
    from builder.sources.demos.minilm import model_folder

    folder = model_folder()
    model = load_model(f"hf:{folder}", tmp_path / "work")
    assert model.name == "model"
    assert model.transformer and model.task == "embedding"
    assert model.default_precisions == ["fp32", "fp16", "bf16", "int8-dynamic"]
    assert [s.name for s in model.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(s.dtype == "int64" and s.shape == [-1] for s in model.inputs)
    assert model.outputs == [TensorSpec("embeddings", "float32", [384])]
    assert model.calibration.inputs["input_ids"].shape == (256, 128)
    assert model.evaluation.inputs["input_ids"].shape == (200, 128)
    feeds = model.evaluation.take(4).inputs
    import torch

    # QAT's extra rows and per-token states.
    assert model.training is not None and model.training.inputs["input_ids"].shape[1] == 128
    trainable = model.trainable
    assert trainable is not None and trainable.token_mask == "attention_mask"
    encoder = trainable.module.get_submodule(trainable.token_states)
    states = encoder(**{k: torch.from_numpy(v[:2]) for k, v in feeds.items()})[0]
    assert tuple(states.shape) == (2, 128, 384)
    # Sequence length is dynamic, and padding does not change the pooled embedding.
    (padded,) = _run(model.fp32_onnx, feeds)
    (short,) = _run(model.fp32_onnx, {k: v[:, :64] for k, v in feeds.items()})
    assert padded.shape == (4, 384)
    np.testing.assert_allclose(np.linalg.norm(padded, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(padded, short, atol=1e-5)
    # Same embeddings as the reference implementation (sentence-transformers, in PyTorch).
    from sentence_transformers import SentenceTransformer

    from builder.sources.hf_folder import split_sentences

    reference = SentenceTransformer(str(folder), device="cpu", local_files_only=True).encode(
        split_sentences()[1][:4], normalize_embeddings=True
    )
    np.testing.assert_allclose(padded, reference, atol=1e-4)


@pytest.mark.slow
@pytest.mark.integration
def test_digits_demo_held_out_accuracy(tmp_path: Path) -> None:
    model = load_model("digits", tmp_path / "work")
    assert (model.name, model.task, model.max_batch_size) == ("digits", "classification", 64)
    assert model.inputs == [TensorSpec("image", "float32", [1, 32, 32])]
    assert model.outputs == [TensorSpec("logits", "float32", [10])]
    assert model.evaluation.labels is not None and len(model.evaluation) == 360
    assert len(model.calibration) > 0
    held_out = model.evaluation.inputs["image"]
    predictions = np.concatenate(
        [_run(model.fp32_onnx, batch)[0].argmax(axis=1) for batch in model.evaluation.batches(64)]
    )
    accuracy = float((predictions == model.evaluation.labels).mean())
    assert accuracy >= 0.97, f"held-out accuracy {accuracy:.4f} on {len(held_out)} images"
    # The trained weights are cached: a rebuild skips training and exports the same model.
    again = load_model("digits", tmp_path / "again")
    assert any("reused from the cache" in n for n in again.notes)
    np.testing.assert_array_equal(
        _run(again.fp32_onnx, again.evaluation.take(8).inputs)[0],
        _run(model.fp32_onnx, model.evaluation.take(8).inputs)[0],
    )


@pytest.mark.slow
def test_resnet50_demo_exports_random_weights_with_a_warning(tmp_path: Path) -> None:
    model = load_model("resnet50", tmp_path / "work")
    assert (model.name, model.task, model.max_batch_size) == ("resnet50", "classification", 32)
    assert model.accuracy_meaningful is False
    assert any("not meaningful" in n for n in model.notes)
    assert model.inputs == [TensorSpec("pixel_values", "float32", [3, 224, 224])]
    assert model.outputs == [TensorSpec("logits", "float32", [1000])]
    assert model.fp32_onnx.stat().st_size > 90e6
    (logits,) = _run(model.fp32_onnx, model.evaluation.take(2).inputs)
    assert logits.shape == (2, 1000) and np.isfinite(logits).all()
