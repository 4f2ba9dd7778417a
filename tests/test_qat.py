"""int8-qat: the fake quantization matches ONNX Runtime's grids, training moves the weights and
is cached, the budget search adds QAT only when post-training INT8 misses, and the summary and
the load-test report label QAT variants."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

from builder.options import BuildOptions
from builder.pipeline import build_model, qat_wanted
from builder.sources.base import Dataset, LoadedModel, Trainable
from common.model_repository import Manifest, VariantRecord, load_manifest, manifest_path

TINY = textwrap.dedent(
    """
    import torch
    from common.model_repository import TensorSpec

    def tiny():
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4)
        )
        return net, [TensorSpec("x", "float32", [8])]
    """
)


@pytest.fixture()
def tiny_factory(tmp_path: Path) -> str:
    path = tmp_path / "tiny_qat.py"
    path.write_text(TINY)
    return f"torch:{path}:tiny"


@pytest.fixture()
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRECISION_SERVE_CACHE", str(tmp_path / "cache"))


def _options(repo: Path, force: bool = False, **extra: object) -> BuildOptions:
    qat = {"steps": 15, "batch_size": 16, **extra}
    return BuildOptions(
        repository=repo,
        force=force,
        precisions=["fp32", "int8-qat"],
        measure_speed=False,
        progress=False,
        extra={"qat": qat},
    )


# ---- the emulated quantizer ----------------------------------------------------------------
def test_weight_fake_quant_is_onnxruntime_symmetric_per_channel_and_comes_off() -> None:
    import torch

    from builder.qat import Quantizer, attach_fake_quant, detach_fake_quant

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 3)
    original = layer.weight.detach().clone()
    handles = attach_fake_quant(layer, Quantizer("dynamic"))
    w = layer.weight.detach()
    for row, orig in zip(w, original, strict=True):
        scale = orig.abs().max() / 127  # ORT: symmetric S8, [-127, 127], per output channel
        steps = row / scale
        assert torch.allclose(steps, steps.round(), atol=1e-3)
        assert steps.abs().max() <= 127 + 1e-3
    assert not torch.equal(w, original)  # really rounded
    detach_fake_quant(layer, handles)
    assert torch.equal(layer.weight.detach(), original)
    assert not hasattr(layer, "input_fake_quant")


def test_dynamic_activation_fake_quant_uses_each_batch_range() -> None:
    import torch

    from builder.qat import Quantizer, attach_fake_quant

    layer = torch.nn.Linear(4, 2)
    attach_fake_quant(layer, Quantizer("dynamic"))
    layer(torch.full((1, 4), 100.0))
    small = torch.linspace(-1, 1, 8).reshape(2, 4)
    layer(small)
    fq = layer.input_fake_quant
    # The second batch's range alone (a static observer would remember 100): 255 U8 steps.
    assert float(fq.scale) == pytest.approx(2 / 255, rel=1e-4)


def test_embedding_fake_quant_is_onnxruntime_gather_quantization() -> None:
    import onnx
    import torch
    from onnxruntime.quantization.quant_utils import quantize_data

    from builder.qat import Quantizer, attach_fake_quant

    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 6)
    table = emb.weight.detach().numpy().copy()
    attach_fake_quant(emb, Quantizer("dynamic"))
    # ORT quantizes a Gather's table as an activation: per tensor, U8, affine over [min, max].
    zero, scale, q = quantize_data(table.flatten(), onnx.TensorProto.UINT8, False)
    expected = ((q.astype(np.float32) - zero) * scale).reshape(table.shape)
    np.testing.assert_allclose(emb.weight.detach().numpy(), expected, atol=1e-6)


def _dynamic_quantize_linear(x: np.ndarray) -> np.ndarray:
    """ONNX Runtime's DynamicQuantizeLinear -> DequantizeLinear on ``x`` (what a dynamic INT8
    MatMul's input becomes)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ],
        "dql",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_dynamic_range_is_onnxruntime_dynamic_quantize_linear_and_has_a_gradient() -> None:
    import torch

    from builder.qat import Quantizer, attach_fake_quant

    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 4)
    attach_fake_quant(layer, Quantizer("dynamic"), range_gradient=True)
    x = torch.randn(3, 16)
    x[1, 5] = 9.0  # an outlier sets the range
    x.requires_grad_(True)
    y = layer.input_fake_quant(x)
    # The same values as ONNX Runtime's run-time quantization of this batch.
    np.testing.assert_allclose(
        y.detach().numpy(), _dynamic_quantize_linear(x.detach().numpy()), atol=1e-6
    )
    # Pulling the quantized values towards the real ones: rounding alone passes the gradient
    # straight through (2 (y - x) for every element); the range's own gradient reaches only
    # the elements that set it (the batch's max and min).
    target = x.detach()
    ((y - target) ** 2).sum().backward()
    straight = 2 * (y - target).detach()
    extra = (x.grad - straight).abs()
    lo = int(x.detach().argmin())
    assert float(extra[1, 5]) > 1e-3 and float(extra.flatten()[lo]) > 1e-3
    others = torch.ones_like(extra, dtype=torch.bool)
    others[1, 5] = False
    others.view(-1)[lo] = False
    assert float(extra[others].max()) < 1e-6


def test_per_token_loss_counts_only_the_real_tokens() -> None:
    import torch

    from builder.qat import _token_loss

    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    student = teacher.clone()
    student[:, 3:] += 100.0  # the padding: never compared
    assert float(_token_loss(student, teacher, mask)) == pytest.approx(0.0)
    student[0, 1] += 1.0
    assert float(_token_loss(student, teacher, mask)) > 0.0


# ---- training ------------------------------------------------------------------------------
class _MaskedMean:
    """A tiny mask-aware encoder (embedding -> linear -> mean over the mask) that records the
    input shapes it is called with."""

    @staticmethod
    def make() -> tuple[object, list[tuple[int, ...]]]:
        import torch

        seen: list[tuple[int, ...]] = []

        class Net(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                torch.manual_seed(0)
                self.emb = torch.nn.Embedding(30, 8)
                self.lin = torch.nn.Linear(8, 8)

            def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
                seen.append(tuple(ids.shape))
                h = self.lin(self.emb(ids)) * mask.unsqueeze(-1)
                return h.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)

        return Net(), seen


def _trainable_model(module: object, rows: int = 32, length: int = 12) -> LoadedModel:
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 30, size=(rows, length))
    mask = np.zeros((rows, length), np.int64)
    for i in range(rows):
        mask[i, : rng.integers(2, 5)] = 1  # short sentences, padded to `length`
    data = Dataset({"input_ids": ids * mask, "attention_mask": mask})
    m = _model()
    m.task, m.calibration = "embedding", data
    m.trainable = Trainable(module, ["input_ids", "attention_mask"], lambda mod, path: None)
    return m


def test_training_rows_are_appended_to_the_calibration_rows() -> None:
    a = Dataset({"x": np.zeros((2, 3))}, np.array([0, 1]), "2 calibration rows")
    b = Dataset({"x": np.ones((3, 3))}, None, "3 more (training only)")
    both = a.concat(b)
    assert len(both) == 5 and both.inputs["x"][2:].sum() == 9
    assert both.labels is None  # labels only where every row has one
    assert both.description == "2 calibration rows + 3 more (training only)"
    assert len(a.concat(a).labels) == 4
    with pytest.raises(ValueError, match="inputs differ"):
        a.concat(Dataset({"y": np.zeros((1, 3))}))


def test_training_batches_are_padded_as_the_rows_are_served() -> None:
    from builder.qat import Quantizer, TrainingSettings, train

    module, seen = _MaskedMean.make()
    model = _trainable_model(module)
    train(model, model.calibration, Quantizer("dynamic"), TrainingSettings(3, 8, 1e-3, 60), False)
    # Dynamic INT8 takes its ranges over the padded tensor: training sees the same 12 tokens
    # (masks are at most 4 long), never a batch trimmed to its longest mask.
    assert seen and {shape[1] for shape in seen} == {12}


def test_weights_that_do_worse_on_held_out_rows_are_not_kept() -> None:
    import torch

    from builder.qat import Quantizer, TrainingSettings, split_held_out, train

    train_idx, held_idx = split_held_out(32)
    assert len(held_idx) == 4 and not set(train_idx) & set(held_idx)
    assert len(train_idx) + len(held_idx) == 32
    module, _ = _MaskedMean.make()
    model = _trainable_model(module)
    original = {k: v.clone() for k, v in module.state_dict().items()}
    # A rate that wrecks the model: every step scores worse than the original weights.
    trained, record = train(
        model, model.calibration, Quantizer("dynamic"), TrainingSettings(5, 8, 50.0, 60), False
    )
    assert record.held_out_rows == 4 and record.steps == 5
    assert record.best_step == 0 and record.held_out_loss_best == record.held_out_loss_start
    for k, v in trained.state_dict().items():
        assert torch.equal(v, original[k]), k


# ---- building ------------------------------------------------------------------------------
@pytest.mark.usefixtures("own_cache")
def test_tiny_torch_int8_qat_trains_records_and_reuses_the_trained_result(
    tiny_factory: str, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    manifest = build_model(tiny_factory, _options(repo, mode="static"))
    v = manifest.variants["int8-qat"]
    qat = v.details["qat"]
    assert qat["mode"] == "static" and qat["steps"] == 15 and not qat["cache_hit"]
    assert qat["objective"].startswith("distillation")  # synthetic rows: no labels
    # 64 synthetic rows: 8 held out to pick the weights kept, 56 trained on.
    assert qat["rows"] == 56 and qat["held_out_rows"] == 8 and qat["seconds"] >= 0
    assert 0 <= qat["best_step"] <= 15
    assert v.details["format"] == "QDQ"
    assert [t["mode"] for t in v.details["qat_tried"]] == ["static"]
    assert v.quality["finite"] == 1.0 and v.quality["cosine_mean"] > 0.9
    import onnx

    ops = {n.op_type for n in onnx.load(str(repo / v.file)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    # Unchanged source, data and settings: the trained export is reused.
    again = build_model(tiny_factory, _options(repo, force=True, mode="static"))
    assert again.variants["int8-qat"].details["qat"]["cache_hit"] is True
    # Changed settings: trained again.
    other = build_model(tiny_factory, _options(repo, force=True, mode="static", steps=12))
    assert other.variants["int8-qat"].details["qat"]["cache_hit"] is False


@pytest.mark.usefixtures("own_cache")
def test_an_onnx_source_cannot_be_trained(tiny_onnx: Path, tmp_path: Path) -> None:
    manifest = build_model(f"onnx:{tiny_onnx}", _options(tmp_path / "repo"))
    assert "int8-qat" not in manifest.variants
    assert any(n.startswith("int8-qat skipped: int8-qat needs a source") for n in manifest.notes)


@pytest.mark.integration
@pytest.mark.slow
def test_digits_int8_qat_matches_fp32_accuracy_and_post_training_int8(tmp_path: Path) -> None:
    # The shared cache: the digits weights the other tests trained (keyed by content).
    manifest = build_model(
        "digits",
        BuildOptions(
            repository=tmp_path / "repo",
            precisions=["fp32", "int8", "int8-qat"],
            measure_speed=False,
            progress=False,
            extra={"qat": {"steps": 40, "mode": "static"}},
        ),
    )
    acc = {p: v.quality["accuracy"] for p, v in manifest.variants.items()}
    assert acc["int8-qat"] == acc["fp32"]
    assert acc["int8-qat"] >= acc["int8"]
    assert manifest.variants["int8-qat"].details["qat"]["objective"].startswith("labels")


# ---- when the budget search adds QAT --------------------------------------------------------
def _model(trainable: bool = True) -> LoadedModel:
    data = Dataset({"x": np.zeros((2, 8), np.float32)})
    return LoadedModel(
        name="m",
        source="torch:m.py:m",
        task="classification",
        fp32_onnx=Path("m.onnx"),
        inputs=[],
        outputs=[],
        calibration=data,
        evaluation=data,
        trainable=Trainable(object(), ["x"], lambda m, p: None) if trainable else None,
    )


def _manifest(**variants: dict) -> Manifest:
    m = Manifest(
        model="m", source="s", task="classification", inputs=[], outputs=[], max_batch_size=8
    )
    for p, details in variants.items():
        m.variants[p] = VariantRecord(precision=p, triton_name=f"m_{p}", file="f", details=details)
    return m


def test_qat_is_added_only_when_post_training_int8_misses_the_budget_fully_quantized() -> None:
    budget = BuildOptions(accuracy_budget=0.5)
    precisions = ["fp32", "int8-dynamic"]
    kept = {"budget_met": True, "fp32_kept_nodes": ["MatMul_1"]}
    full = {"budget_met": True, "fp32_kept_nodes": []}
    # Missed (not written) or met only with layers kept FP32: QAT.
    assert qat_wanted(_model(), budget, precisions, _manifest())
    assert qat_wanted(_model(), budget, precisions, _manifest(**{"int8-dynamic": kept}))
    # Met fully quantized: none.
    assert qat_wanted(_model(), budget, precisions, _manifest(**{"int8-dynamic": full})) is None
    # No budget, no post-training INT8 asked for, an untrainable source, --qat never: none.
    assert qat_wanted(_model(), BuildOptions(), precisions, _manifest()) is None
    assert qat_wanted(_model(), budget, ["fp32"], _manifest()) is None
    assert qat_wanted(_model(False), budget, precisions, _manifest()) is None
    never = BuildOptions(accuracy_budget=0.5, extra={"qat": {"when": "never"}})
    assert qat_wanted(_model(), never, precisions, _manifest()) is None
    always = BuildOptions(extra={"qat": {"when": "always"}})
    assert qat_wanted(_model(), always, ["fp32"], _manifest()) == "--qat always"


@pytest.mark.usefixtures("own_cache")
def test_qat_never_skips_an_explicit_int8_qat(tiny_factory: str, tmp_path: Path) -> None:
    manifest = build_model(tiny_factory, _options(tmp_path / "repo", when="never"))
    assert "int8-qat" not in manifest.variants
    assert "int8-qat skipped: --qat never" in manifest.notes


# ---- labels --------------------------------------------------------------------------------
@pytest.mark.usefixtures("own_cache")
def test_summary_and_load_test_report_label_the_qat_variant(
    tiny_factory: str, tmp_path: Path
) -> None:
    from builder.report import summary
    from loadtest.report import variant_info

    repo = tmp_path / "repo"
    build_model(tiny_factory, _options(repo, mode="dynamic"))
    manifest = load_manifest(manifest_path(repo, "tiny"))
    text = summary(manifest)
    assert "note: int8-qat is quantization-aware trained (dynamic INT8, 15 steps" in text
    info, _ = variant_info(repo, "tiny")
    assert info["int8-qat"].training == "QAT, dynamic INT8"
    assert info["fp32"].training is None
