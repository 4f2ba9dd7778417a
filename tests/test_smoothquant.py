"""SmoothQuant (builder/smoothquant.py): the rescaling keeps the FP32 function, folds where that is
exact, lowers INT8 error on an activation-outlier channel, is chosen only when it helps, is
recorded in the manifest and the summary, and is int8-qat's starting point."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from builder.options import BuildOptions
from builder.pipeline import build_model
from builder.sources.base import Dataset

# A pre-LayerNorm MLP block whose LayerNorm gives channel 3 a 40x gain: an activation outlier
# channel, as in transformers' residual streams.
OUTLIER = textwrap.dedent(
    """
    import torch
    from builder.sources.torch_module import TorchModelSpec
    from common.model_repository import TensorSpec

    GAIN = 40.0

    class Block(torch.nn.Module):
        def __init__(self, gain):
            super().__init__()
            torch.manual_seed(0)
            self.norm = torch.nn.LayerNorm(16)
            with torch.no_grad():
                self.norm.weight[3] = gain
            self.up = torch.nn.Linear(16, 64)
            self.down = torch.nn.Linear(64, 8)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(self.norm(x)))).mean(1)

    def outlier():
        return TorchModelSpec(Block(GAIN), [TensorSpec("x", "float32", [6, 16])], task="embedding")

    def plain():
        return TorchModelSpec(Block(1.0), [TensorSpec("x", "float32", [6, 16])], task="embedding")
    """
)


@pytest.fixture()
def block_module(tmp_path: Path) -> Path:
    path = tmp_path / "sq_block.py"
    path.write_text(OUTLIER)
    return path


@pytest.fixture()
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRECISION_SERVE_CACHE", str(tmp_path / "cache"))


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _tiny_bert(path: Path) -> Dataset:
    """A 2-layer BERT (transformers' own modelling code, random weights) exported as the hf:
    source exports encoders; returns padded token rows for it."""
    import torch
    from transformers import BertConfig, BertModel

    from builder.prepare import optimize_basic
    from builder.sources.common import export_torch_to_onnx

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    config._attn_implementation = "eager"
    bert = BertModel(config, add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.bert(input_ids=ids, attention_mask=mask).last_hidden_state

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 60, size=(24, 12))
    mask = (np.arange(12)[None, :] < rng.integers(3, 12, size=(24, 1))).astype(np.int64)
    data = Dataset({"ids": ids * mask, "mask": mask})
    axes = {"ids": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}, "hidden": {0: "b", 1: "s"}}
    raw = path.with_name(f"{path.stem}-raw.onnx")
    export_torch_to_onnx(Encoder(), data.take(2).inputs, ["hidden"], raw, axes)
    optimize_basic(raw, path)  # as the builder prepares its FP32 reference
    return data


def _block_onnx(path: Path, gain: float) -> Dataset:
    import importlib.util
    import sys

    import torch

    from builder.sources.common import export_torch_to_onnx

    spec = importlib.util.spec_from_file_location("sq_block_onnx", path.parent / "sq_block.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["sq_block_onnx"] = mod
    spec.loader.exec_module(mod)
    torch.manual_seed(1)
    data = Dataset({"x": np.random.default_rng(1).standard_normal((64, 6, 16), np.float32)})
    export_torch_to_onnx(mod.Block(gain), data.take(2).inputs, ["y"], path)
    return data


def test_rescaling_keeps_a_bert_encoders_fp32_outputs_and_folds_v_into_its_linear(
    tmp_path: Path,
) -> None:
    import onnx

    from builder.smoothquant import PREFIX, smooth

    src = tmp_path / "bert.onnx"
    data = _tiny_bert(src)
    record = smooth(src, tmp_path / "smoothed.onnx", 0.8, data)
    feeds = data.take(8).inputs
    np.testing.assert_allclose(
        _run(tmp_path / "smoothed.onnx", feeds), _run(src, feeds), rtol=1e-4, atol=1e-5
    )
    # Per layer: Q/K/V (one shared input), the attention output, FFN in, FFN out.
    assert record.groups == 8 and record.matmuls == 12
    # The attention output's rescaling folds into V's Linear (through the heads' reshapes
    # and probabilities x V); post-LN BERT's LayerNorms also feed residual Adds: not exact
    # there, so Q/K/V and FFN-in keep a Mul, as does FFN-out (after GELU).
    assert (record.folded_linear, record.folded_layernorm, record.muls) == (2, 0, 6)
    graph = onnx.load(str(tmp_path / "smoothed.onnx")).graph
    assert sum(n.op_type == "Mul" and n.name.startswith(PREFIX) for n in graph.node) == 6
    # Really rescaled: the weights differ from the source's.
    before = {i.name for i in onnx.load(str(src)).graph.initializer}
    assert any(i.name not in before for i in graph.initializer)


def test_rescaling_folds_into_a_layernorm_that_feeds_only_the_linear(
    block_module: Path, tmp_path: Path
) -> None:
    from builder.smoothquant import smooth

    src = tmp_path / "block.onnx"
    data = _block_onnx(src, 40.0)
    record = smooth(src, tmp_path / "smoothed.onnx", 0.5, data)
    feeds = data.take(8).inputs
    np.testing.assert_allclose(
        _run(tmp_path / "smoothed.onnx", feeds), _run(src, feeds), rtol=1e-4, atol=1e-5
    )
    assert (record.folded_layernorm, record.folded_linear, record.muls) == (1, 0, 1)


def test_rescaling_lowers_dynamic_int8_error_on_an_outlier_channel(
    block_module: Path, tmp_path: Path
) -> None:
    from builder.precisions.int8 import preprocess
    from builder.precisions.int8_dynamic import quantize_dynamic_int8
    from builder.smoothquant import smooth

    src = tmp_path / "block.onnx"
    data = _block_onnx(src, 40.0)
    smooth(src, tmp_path / "smoothed.onnx", 0.8, data)
    feeds = data.take(32).inputs
    reference = _run(src, feeds)

    def int8_error(path: Path) -> float:
        q = tmp_path / f"{path.stem}-int8.onnx"
        quantize_dynamic_int8(preprocess(path, tmp_path / f"{path.stem}-pre.onnx"), q)
        return float(np.abs(_run(q, feeds) - reference).mean())

    plain, smoothed = int8_error(src), int8_error(tmp_path / "smoothed.onnx")
    assert smoothed < 0.5 * plain, (plain, smoothed)


def test_the_choice_takes_a_rescaling_only_when_it_helps(tmp_path: Path) -> None:
    from builder.precisions.smoothing import Trial, pick

    def trials(*losses: float, speeds: tuple[float | None, ...] = (None, None, None)) -> list:
        alphas = (None, 0.5, 0.8)
        return [
            Trial(a, tmp_path, loss, s) for a, loss, s in zip(alphas, losses, speeds, strict=True)
        ]

    # Lower loss by more than 10 %: taken; by less: not (the Muls cost time for nothing).
    assert pick(trials(0.7, 1.1, 0.35), None)[0].alpha == 0.8
    assert pick(trials(0.7, 0.69, 0.66), None)[0].alpha is None
    assert pick(trials(0.005, 0.0045, 0.0041), None)[0].alpha is None  # < 0.001 points
    # Within the budget fully quantized: the fastest; untimed, the unscaled one.
    assert pick(trials(0.3, 0.2, 0.1), 0.5)[0].alpha is None
    assert pick(trials(0.3, 0.2, 0.1, speeds=(2.0, 1.6, 1.9)), 0.5)[0].alpha is None
    assert pick(trials(0.3, 0.2, 0.1, speeds=(1.5, 1.6, 1.9)), 0.5)[0].alpha == 0.8
    # Over the budget unscaled: the lowest loss, which the budget search starts from.
    assert pick(trials(0.9, 0.4, 0.6), 0.5)[0].alpha == 0.5


def _options(repo: Path, precisions: list[str], **kw: Any) -> BuildOptions:
    extra = {"qat": {"when": "never"}, **kw.pop("extra", {})}
    return BuildOptions(
        repository=repo,
        precisions=precisions,
        measure_speed=False,
        progress=False,
        extra=extra,
        **kw,
    )


@pytest.mark.usefixtures("own_cache")
def test_budget_search_records_the_alpha_in_the_manifest_and_the_summary(
    block_module: Path, tmp_path: Path
) -> None:
    from builder.report import summary

    repo = tmp_path / "repo"
    manifest = build_model(
        f"torch:{block_module}:outlier",
        _options(
            repo, ["fp32", "int8-dynamic", "int8"], accuracy_budget=0.005, keep_over_budget=True
        ),
    )
    for precision in ("int8-dynamic", "int8"):
        sq = manifest.variants[precision].details["smoothquant"]
        assert sq["alpha"] in (0.5, 0.8), sq
        assert [t["alpha"] for t in sq["tried"]] == [None, 0.5, 0.8]
        unscaled, chosen = sq["tried"][0], next(t for t in sq["tried"] if t["alpha"] == sq["alpha"])
        assert chosen["accuracy_loss"] < 0.9 * unscaled["accuracy_loss"]
    text = summary(manifest)
    header = next(line for line in text.splitlines() if line.startswith("| precision"))
    assert "smooth a" in header
    row = next(line for line in text.splitlines() if line.startswith("| int8-dynamic"))
    column = [c.strip() for c in header.split("|")].index("smooth a")
    alpha = manifest.variants["int8-dynamic"].details["smoothquant"]["alpha"]
    assert row.split("|")[column].strip() == f"{alpha:g}"
    # Without a budget (and with 'none'), no rescaling: the builds are as before.
    plain = build_model(
        f"torch:{block_module}:outlier", _options(tmp_path / "r2", ["fp32", "int8-dynamic"])
    )
    assert plain.variants["int8-dynamic"].details["smoothquant"]["alpha"] is None
    off = build_model(
        f"torch:{block_module}:outlier",
        _options(
            tmp_path / "r3",
            ["fp32", "int8-dynamic"],
            accuracy_budget=0.05,
            extra={"smoothquant": {"alphas": ()}},
        ),
    )
    assert off.variants["int8-dynamic"].details["smoothquant"]["alpha"] is None


@pytest.mark.usefixtures("own_cache")
def test_no_rescaling_where_the_activations_have_no_outlier(
    block_module: Path, tmp_path: Path
) -> None:
    manifest = build_model(
        f"torch:{block_module}:plain",
        _options(
            tmp_path / "repo", ["fp32", "int8-dynamic"], accuracy_budget=0.0, keep_over_budget=True
        ),
    )
    sq = manifest.variants["int8-dynamic"].details["smoothquant"]
    assert len(sq["tried"]) == 3 and sq["alpha"] is None, sq


@pytest.mark.usefixtures("own_cache")
def test_int8_qat_trains_from_the_rescaled_module(block_module: Path, tmp_path: Path) -> None:
    import onnx

    from builder.report import summary
    from builder.smoothquant import PREFIX

    repo = tmp_path / "repo"
    manifest = build_model(
        f"torch:{block_module}:outlier",
        _options(
            repo,
            ["fp32", "int8-qat"],
            extra={"qat": {"steps": 6, "batch_size": 16, "mode": "dynamic", "when": "auto"}},
        ),
    )
    v = manifest.variants["int8-qat"]
    sq, qat = v.details["smoothquant"], v.details["qat"]
    assert sq["alpha"] in (0.5, 0.8)
    assert any("SmoothQuant-rescaled module" in n for n in qat["notes"]), qat["notes"]
    assert v.details["qat_tried"][0]["post_training"]["smoothquant_alpha"] == sq["alpha"]
    # The served file carries the rescaling (the LayerNorm fold and the Mul after GELU).
    graph = onnx.load(str(repo / v.file)).graph
    assert any(n.name.startswith(PREFIX) for n in graph.node)
    assert "from the SmoothQuant-rescaled model (alpha" in summary(manifest)


def test_training_hands_back_the_module_unscaled() -> None:
    import torch

    from builder.qat import LinearScales, Quantizer, TrainingSettings, train
    from builder.sources.base import LoadedModel, Trainable

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    original = {k: v.clone() for k, v in net.state_dict().items()}
    data = Dataset({"x": np.random.default_rng(0).standard_normal((32, 8), np.float32)})
    model = LoadedModel(
        name="m",
        source="torch:m",
        task="embedding",
        fp32_onnx=Path("m.onnx"),
        inputs=[],
        outputs=[],
        calibration=data,
        evaluation=data,
        trainable=Trainable(net, ["x"], lambda m, p: None),
    )
    scales = LinearScales(0.8, "k", {"2": np.linspace(0.1, 10, 16).astype(np.float32)})
    seen: list[bool] = []

    def hook(step: int, loss: float, student: object) -> None:
        seen.append(type(student[2]).__name__ == "Smoothed")  # type: ignore[index]

    trained, _ = train(
        model, data, Quantizer("dynamic"), TrainingSettings(3, 8, 1e-9, 60), False, hook, scales
    )
    assert seen and all(seen)  # trained rescaled
    assert isinstance(trained[2], torch.nn.Linear)  # handed back plain
    for k, v in trained.state_dict().items():  # lr ~0: the original weights again
        torch.testing.assert_close(v, original[k], rtol=1e-5, atol=1e-6)
