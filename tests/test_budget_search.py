"""The accuracy-budget search: the fastest variant within the budget, or a clear "not met".

The search itself is tested with fake builders and timers (no timed assertions); the
precisions end to end on a small synthetic transformer-like ONNX model whose one sensitive
MatMul must be the layer kept in FP32.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from builder import pipeline
from builder.budget import search
from builder.options import BuildOptions
from builder.pipeline import build_model
from builder.report import summary
from common.model_repository import load_manifest

SENSITIVE = "ffn_out"
HIDDEN = 32


def make_sensitive_transformer(path: Path, seed: int = 0) -> Path:
    """x [batch, 8 tokens, 32] -> two residual blocks (attention-like projection, FFN).

    ``ffn_out``'s weights hold one row of large values (+-40) that multiplies an activation
    the previous layer always makes zero: harmless in FP32, but per-channel INT8 scales become
    40/127, which rounds its ordinary weights (std 0.1) to zero. Its INT8 error dominates."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(shape: tuple[int, ...], std: float = 0.2) -> np.ndarray:
        return rng.normal(0, std, shape).astype(np.float32)

    w_in, w_proj, w_up = w((HIDDEN, HIDDEN)), w((HIDDEN, HIDDEN)), w((HIDDEN, 2 * HIDDEN))
    w_up[:, 0] = 0.0  # the FFN's unit 0 is always zero after ReLU...
    w_down = w((2 * HIDDEN, HIDDEN), 0.1)
    w_down[0, :] = 40.0 * np.sign(rng.normal(size=HIDDEN))  # ...so these never matter in FP32
    w_head = w((HIDDEN, HIDDEN))
    inits = {
        "w_in": w_in,
        "w_proj": w_proj,
        "w_up": w_up,
        "w_down": w_down,
        "w_head": w_head,
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["h0"], name="embed_proj"),
        helper.make_node("MatMul", ["h0", "w_proj"], ["a0"], name="attn_proj"),
        helper.make_node("Add", ["h0", "a0"], ["h1"], name="attn_residual"),
        helper.make_node("MatMul", ["h1", "w_up"], ["u0"], name="ffn_up"),
        helper.make_node("Relu", ["u0"], ["u1"], name="ffn_act"),
        helper.make_node("MatMul", ["u1", "w_down"], ["d0"], name=SENSITIVE),
        helper.make_node("Add", ["h1", "d0"], ["h2"], name="ffn_residual"),
        helper.make_node("MatMul", ["h2", "w_head"], ["emb"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "sensitive",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, HIDDEN])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["batch", 8, HIDDEN])],
        initializer=[numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def sensitive_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_sensitive_transformer(tmp_path_factory.mktemp("sensitive") / "sensitive.onnx")


def _build(onnx_path: Path, repo: Path, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("measure_speed", False)
    return build_model(f"onnx:{onnx_path}", BuildOptions(repository=repo, force=True, **kw))


# ---- the search with fakes --------------------------------------------------------------
class Fake:
    """Candidates whose loss drops once ``sensitive`` is kept; speed falls per kept node."""

    def __init__(self, tmp: Path, sensitive: str = "c", start: float = 1.5, step: float = 0.1):
        self.tmp, self.sensitive, self.start, self.step = tmp, sensitive, start, step
        self.built: list[list[str]] = []
        self.ranked_calls = 0

    def rank(self, path: Path) -> list[str]:
        self.ranked_calls += 1
        return ["a", "b", "c", "d", "e", "f", "g", "h", "i"]

    def make(self, kept: list[str]) -> tuple[Path, float]:
        self.built.append(kept)
        path = self.tmp / f"cand-{len(kept)}.onnx"
        path.write_text(",".join(kept))
        return path, 0.05 if self.sensitive in kept else 2.0

    def speed(self, path: Path) -> float:
        kept = [k for k in path.read_text().split(",") if k]
        return self.start - self.step * len(kept)


def test_within_budget_from_the_start_keeps_nothing(tmp_path: Path) -> None:
    fake = Fake(tmp_path, sensitive="")
    fake.make = lambda kept: (fake.tmp / "full.onnx", 0.01)  # type: ignore[method-assign]
    (tmp_path / "full.onnx").write_text("")
    out = search(fake.rank, fake.make, fake.speed, 0.1, tmp_path / "out.onnx")
    assert out.met and out.chosen.kept == []
    assert fake.ranked_calls == 0  # no ranking, no search
    assert (tmp_path / "out.onnx").is_file()


def test_search_finds_the_fewest_kept_layers_that_meet_the_budget(tmp_path: Path) -> None:
    fake = Fake(tmp_path, sensitive="c")
    out = search(fake.rank, fake.make, fake.speed, 0.1, tmp_path / "out.onnx")
    # 1, 2 miss; 4 meets; bisection finds 3 (a, b, c) meets: fewest kept = fastest.
    assert out.met, out.status
    assert out.chosen.kept == ["a", "b", "c"]
    assert [len(k) for k in fake.built] == [0, 1, 2, 4, 3]
    assert (tmp_path / "out.onnx").read_text() == "a,b,c"
    d = out.details()
    assert d["budget_met"] is True and d["accuracy_budget"] == 0.1
    assert d["fp32_kept_nodes"] == ["a", "b", "c"]
    assert [a["kept"] for a in d["budget_attempts"]] == [0, 1, 2, 3, 4]


def test_met_only_slower_than_fp32_is_not_met(tmp_path: Path) -> None:
    # 1.3x with nothing kept, 0.1x lost per kept layer: meeting it (a, b, c) is 1.0x fp32.
    fake = Fake(tmp_path, sensitive="c", start=1.3, step=0.1)
    out = search(fake.rank, fake.make, fake.speed, 0.1, tmp_path / "out.onnx")
    assert not out.met
    assert "met only slower than 1.05x fp32 (loss 0.050 at 1.00x fp32, 3 kept)" in out.status
    assert "best: loss 2.000 at 1.30x fp32" in out.status  # the best trade-off >= fp32
    assert max(len(k) for k in fake.built) == 4


def test_unreachable_budget_says_not_met_with_the_best_trade_off(tmp_path: Path) -> None:
    fake = Fake(tmp_path, sensitive="nowhere", start=3.0, step=0.01)
    out = search(fake.rank, fake.make, fake.speed, 0.1, tmp_path / "out.onnx")
    assert not out.met
    assert out.status.startswith("budget 0.1 not met (best: loss 2.000 at")
    assert len(fake.built) <= 9  # bounded: the fully quantized one + at most 8 candidates


def test_keeping_every_layer_is_no_result(tmp_path: Path) -> None:
    # Only keeping all 9 rankable nodes meets it, "faster" than fp32 by timing noise.
    fake = Fake(tmp_path, sensitive="i", start=1.5, step=0.01)
    out = search(fake.rank, fake.make, fake.speed, 0.1, tmp_path / "out.onnx")
    assert [len(k) for k in fake.built][-1] == 9
    assert not out.met
    assert "met only with all 9 quantized layers kept FP32" in out.status
    assert len(out.chosen.kept) < 9


def test_without_timings_the_fewest_kept_layers_win(tmp_path: Path) -> None:
    fake = Fake(tmp_path, sensitive="c")
    out = search(fake.rank, fake.make, None, 0.1, tmp_path / "out.onnx")
    assert out.met and out.chosen.kept == ["a", "b", "c"] and out.chosen.speedup is None


# ---- the precisions on the synthetic transformer ------------------------------------------
@pytest.mark.parametrize("precision", ["int8-dynamic", "int8"])
def test_budget_keeps_the_sensitive_matmul_in_fp32(
    tmp_path: Path, sensitive_onnx: Path, precision: str
) -> None:
    loose = _build(sensitive_onnx, tmp_path / "loose", precisions=["fp32", precision])
    loss = loose.variants[precision].details["accuracy_loss"]
    assert loss > 1.0, f"the outlier row should hurt {precision} (loss {loss})"
    assert loose.variants[precision].details["fp32_kept_nodes"] == []

    repo = tmp_path / "tight"
    # SmoothQuant off: the keep-FP32 search alone (with it, see below).
    off = {"smoothquant": {"alphas": ()}}
    tight = _build(
        sensitive_onnx, repo, precisions=["fp32", precision], accuracy_budget=1.0, extra=off
    )
    d = tight.variants[precision].details
    assert d["budget_met"] is True, d["budget_status"]
    assert d["fp32_kept_nodes"] == [SENSITIVE]
    assert d["accuracy_loss"] <= 1.0
    assert d["accuracy_budget"] == 1.0
    assert d["worst_nodes"][0]["node"] == SENSITIVE
    recorded = load_manifest(repo / "sensitive.manifest.json").variants[precision]
    assert recorded.details["fp32_kept_nodes"] == [SENSITIVE]
    # With SmoothQuant (the default): the outlier row's range moves into the weights and the
    # budget is met with nothing kept FP32.
    smoothed = (
        _build(
            sensitive_onnx,
            tmp_path / "smoothed",
            precisions=["fp32", precision],
            accuracy_budget=1.0,
        )
        .variants[precision]
        .details
    )
    assert smoothed["budget_met"] is True and smoothed["fp32_kept_nodes"] == []
    assert smoothed["smoothquant"]["alpha"] is not None


def _slow_timer(reference, model, options):
    return (lambda path: 0.8) if options.accuracy_budget is not None else None


def test_slower_than_fp32_variant_is_not_written_unless_kept(
    tmp_path: Path, sensitive_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline, "_lazy_speedup", _slow_timer)
    repo = tmp_path / "repo"
    opts = {
        "precisions": ["fp32", "int8-dynamic"],
        "accuracy_budget": 0.5,
        "measure_speed": True,
        "extra": {"smoothquant": {"alphas": ()}},  # rescaled, it would meet 0.5 (slowly)
    }
    m = _build(sensitive_onnx, repo, **opts)
    assert "int8-dynamic" not in m.variants
    assert not (repo / "sensitive_int8-dynamic").exists()
    note = next(n for n in m.notes if n.startswith("int8-dynamic not written"))
    assert "not met" in note and "0.80x fp32" in note and "--keep-over-budget" in note
    assert note in summary(m)

    kept = _build(sensitive_onnx, repo, keep_over_budget=True, **opts)
    d = kept.variants["int8-dynamic"].details
    assert d["budget_met"] is False
    assert "kept by --keep-over-budget" in d["budget_status"]
    text = summary(kept)
    assert "NOT MET" in text and "int8-dynamic is over budget" in text

    again = _build(sensitive_onnx, repo, **opts)  # without --keep-over-budget: the copy goes
    assert "int8-dynamic" not in again.variants
    assert not (repo / "sensitive_int8-dynamic").exists()
