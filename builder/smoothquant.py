"""SmoothQuant (Xiao et al., 2023) on the ONNX graph: a function-preserving per-channel rescaling
that moves activation outliers into the weights before INT8 quantization.

For each group of MatMul / Gemm nodes that read one activation X with a constant weight (Q, K
and V share their input), ``s_j = max|X_j|^alpha / max|W_j,:|^(1-alpha)`` over the input
channels j: activation maxima from calibration rows (padded as served), weight maxima over every
output column of the group. X is divided by s and the weights' input rows multiplied by s: the
FP32 function is unchanged, the quantizers see smaller activation ranges.

The division is folded into the op that makes X where that is exact:

- a ``LayerNormalization`` whose output feeds only this group: gamma and beta / s (pre-LN
  transformers; in BERT-style post-LN encoders the LayerNorm output also feeds a residual Add,
  so there it is not exact and is not done);
- a Linear (constant-weight MatMul / Gemm, optional bias Add) reached through ``Reshape``,
  ``Transpose`` and the attention's probabilities x V: V's output channels / s before the
  attention-output MatMul.

Elsewhere (after GELU; after a LayerNorm that also feeds a residual) the division is an explicit
FP32 ``Mul`` named ``SmoothQuant/...``, which static quantization must leave unquantized
(``smoothing_nodes``: quantizing its input would quantize the unsmoothed range). Folds are
checked: the folded graph must give the unfolded one's outputs on calibration rows, else only
the LayerNorm folds are kept (else none).

ONNX Runtime's own SmoothQuant (``quantize_static(extra_options={"SmoothQuant": True})``) needs
Intel Neural Compressor and exists only for static quantization; this one serves the static and
dynamic quantizers, every source with an ONNX file, and quantization-aware training's starting
point (``builder.qat`` trains with the same scales).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import QuantizationError
from builder.sources.base import Dataset

log = logging.getLogger(__name__)

PREFIX = "SmoothQuant/"
STAT_ROWS = 64  # calibration rows the activation maxima come from
CHECK_ROWS = 4  # rows the folded graph is checked on
FLOOR = 1e-5  # smallest maximum a scale is computed from (dead channels)


@dataclass
class Group:
    """Constant-weight MatMul / Gemm nodes that read one activation tensor."""

    tensor: str
    nodes: list[str] = field(default_factory=list)
    # (initializer name, transposed): a Gemm with transB=1 holds its weight as [N, K]
    weights: list[tuple[str, bool]] = field(default_factory=list)


@dataclass
class Smoothing:
    """What was done to a graph (the manifest's ``smoothquant`` details)."""

    alpha: float
    groups: int
    matmuls: int
    folded_layernorm: int = 0
    folded_linear: int = 0
    muls: int = 0
    rows: int = 0
    scales: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def details(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "inputs_rescaled": self.groups,
            "matmuls": self.matmuls,
            "folded_into_layernorm": self.folded_layernorm,
            "folded_into_linear": self.folded_linear,
            "fp32_muls": self.muls,
            "calibration_rows": self.rows,
        }

    def key(self) -> str:
        """A hash of the scales (part of a trained result's cache key)."""
        h = hashlib.sha256(f"{self.alpha}".encode())
        for name in sorted(self.scales):
            h.update(name.encode())
            h.update(np.ascontiguousarray(self.scales[name], np.float32).tobytes())
        return h.hexdigest()[:16]


def _node_names(model: Any) -> None:
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def _attr(node: Any, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def find_groups(model: Any) -> list[Group]:
    """The constant-weight MatMul / Gemm nodes, grouped by the activation they read."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[str, Group] = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if x in inits or w not in inits:
            continue
        init = inits[w]
        if len(init.dims) != 2 or init.data_type != TensorProto.FLOAT:
            continue
        transposed = False
        if node.op_type == "Gemm":
            if _attr(node, "transA", 0):
                continue
            transposed = bool(_attr(node, "transB", 0))
        g = groups.setdefault(x, Group(x))
        g.nodes.append(node.name)
        g.weights.append((w, transposed))
    return list(groups.values())


def _session(model: Any) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(
        model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"]
    )


def _feeds(session: Any, data: Dataset, batch: int) -> Any:
    names = {i.name for i in session.get_inputs()}
    for rows in data.batches(batch):
        yield {k: v for k, v in rows.items() if k in names}


def channel_maxima(model: Any, groups: list[Group], data: Dataset, batch: int) -> dict[str, Any]:
    """max |x| per input channel (the last axis) of each group's activation, over ``data``."""
    import copy

    from onnx import TensorProto, helper

    probe = copy.deepcopy(model)
    present = {o.name for o in probe.graph.output}
    for g in groups:
        if g.tensor not in present:
            info = helper.make_tensor_value_info(g.tensor, TensorProto.FLOAT, None)
            probe.graph.output.append(info)
    session = _session(probe)
    wanted = [g.tensor for g in groups]
    maxima: dict[str, Any] = {}
    for feed in _feeds(session, data, batch):
        for name, a in zip(wanted, session.run(wanted, feed), strict=True):
            m = np.abs(a).reshape(-1, a.shape[-1]).max(axis=0)
            maxima[name] = m if name not in maxima else np.maximum(maxima[name], m)
    return maxima


def compute_scales(
    model: Any, groups: list[Group], maxima: dict[str, Any], alpha: float
) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    scales = {}
    for g in groups:
        w_max = np.max(
            [np.abs(numpy_helper.to_array(inits[w])).max(axis=0 if t else 1) for w, t in g.weights],
            axis=0,
        )
        x_max = maxima[g.tensor]
        if x_max.shape != w_max.shape:
            raise QuantizationError(
                f"SmoothQuant: {g.tensor} has {x_max.shape[0]} channels, its weights "
                f"{w_max.shape[0]} rows"
            )
        s = np.maximum(x_max, FLOOR) ** alpha / np.maximum(w_max, FLOOR) ** (1 - alpha)
        scales[g.tensor] = s.astype(np.float32)
    return scales


class _Graph:
    """Producers, consumers and initializers of a graph, for the rewrites."""

    def __init__(self, model: Any) -> None:
        from onnx import numpy_helper

        self.model = model
        self.g = model.graph
        self.inits = {i.name: i for i in self.g.initializer}
        self.np = numpy_helper
        self.reindex()

    def reindex(self) -> None:
        self.producer = {o: n for n in self.g.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.graph_io = {o.name for o in self.g.output} | {i.name for i in self.g.input}

    def array(self, name: str) -> np.ndarray:
        return self.np.to_array(self.inits[name])

    def set_array(self, node: Any, index: int, value: np.ndarray) -> None:
        """Give ``node``'s input ``index`` the initializer ``value`` (a copy when it is shared
        with other nodes)."""
        name = node.input[index]
        if len(self.consumers.get(name, [])) > 1 or name in self.graph_io:
            name = self.unique(f"{name}{PREFIX.rstrip('/')}")
            node.input[index] = name
            self.g.initializer.append(self.np.from_array(value.astype(np.float32), name))
            self.inits[name] = self.g.initializer[-1]
            self.reindex()
            return
        self.inits[name].CopyFrom(self.np.from_array(value.astype(np.float32), name))

    def unique(self, name: str) -> str:
        taken = set(self.inits) | set(self.producer) | self.graph_io
        out, i = name, 0
        while out in taken:
            i += 1
            out = f"{name}_{i}"
        return out


def apply_scales(model: Any, groups: list[Group], scales: dict[str, np.ndarray]) -> int:
    """Rescale in place: ``Mul(x, 1/s)`` before each group, the weights' rows times s.
    Returns the number of groups rescaled (those with a scale in ``scales``)."""
    from onnx import helper

    gr = _Graph(model)
    by_name = {n.name: n for n in model.graph.node}
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    inserts: list[tuple[int, Any]] = []
    for g in groups:
        s = scales.get(g.tensor)
        if s is None:
            continue
        nodes = [by_name[n] for n in g.nodes]
        for node, (_, transposed) in zip(nodes, g.weights, strict=True):
            w = gr.array(node.input[1])
            gr.set_array(node, 1, w * (s[None, :] if transposed else s[:, None]))
        inv = gr.unique(f"{PREFIX}{g.tensor}/inverse_scale")
        model.graph.initializer.append(gr.np.from_array((1.0 / s).astype(np.float32), inv))
        gr.inits[inv] = model.graph.initializer[-1]
        out = gr.unique(f"{PREFIX}{g.tensor}")
        mul = helper.make_node("Mul", [g.tensor, inv], [out], name=f"{PREFIX}{g.tensor}")
        inserts.append((min(order[n] for n in g.nodes), mul))
        for node in nodes:
            node.input[0] = out
        gr.producer[out] = mul
    # Each Mul right before the first of its group (after its input's producer): still sorted.
    nodes = list(model.graph.node)
    for index, mul in sorted(inserts, key=lambda im: -im[0]):
        nodes.insert(index, mul)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return len(inserts)


def _remove_mul(gr: _Graph, mul: Any) -> None:
    x, out = mul.input[0], mul.output[0]
    for c in gr.consumers.get(out, []):
        for i, name in enumerate(c.input):
            if name == out:
                c.input[i] = x
    gr.g.node.remove(mul)
    inv = mul.input[1]
    gr.g.initializer.remove(gr.inits.pop(inv))
    gr.reindex()


def _single_use(gr: _Graph, t: str) -> bool:
    """Only one node reads ``t``'s values (a ``Shape`` reads its shape alone)."""
    readers = [n for n in gr.consumers.get(t, []) if n.op_type != "Shape"]
    return len(readers) == 1 and t not in gr.graph_io


def _fold_layernorm(gr: _Graph, mul: Any) -> bool:
    x = mul.input[0]
    ln = gr.producer.get(x)
    if ln is None or ln.op_type != "LayerNormalization" or not _single_use(gr, x):
        return False
    if ln.output[0] != x or _attr(ln, "axis", -1) != -1:
        return False
    params = [i for i in range(1, len(ln.input)) if ln.input[i]]
    if any(ln.input[i] not in gr.inits for i in params):
        return False
    inv = gr.array(mul.input[1])
    for i in params:
        gr.set_array(ln, i, gr.array(ln.input[i]) * inv)
    _remove_mul(gr, mul)
    return True


def _fold_linear(gr: _Graph, mul: Any) -> bool:
    """Walk back from the Mul's input through Reshape / Transpose / (probabilities x V) and a
    bias Add to a constant-weight MatMul / Gemm; scale its output channels (and the bias)."""
    inv = gr.array(mul.input[1])
    t = mul.input[0]
    bias: tuple[Any, int] | None = None
    while True:
        node = gr.producer.get(t)
        if node is None or not _single_use(gr, t):
            return False
        op = node.op_type
        if op in ("Reshape", "Transpose") and node.input[0] not in gr.inits:
            t = node.input[0]
        elif op == "Add" and bias is None:
            const = [i for i in (0, 1) if node.input[i] in gr.inits]
            if len(const) != 1 or gr.array(node.input[const[0]]).shape != inv.shape:
                return False
            bias = (node, const[0])
            t = node.input[1 - const[0]]
        elif op == "MatMul" and node.input[1] in gr.inits:
            w = gr.array(node.input[1])
            if w.ndim != 2 or w.shape[1] != inv.shape[0]:
                return False
            gr.set_array(node, 1, w * inv[None, :])
            break
        elif op == "Gemm" and node.input[1] in gr.inits and not _attr(node, "transA", 0):
            w = gr.array(node.input[1])
            trans = bool(_attr(node, "transB", 0))
            if w.ndim != 2 or w.shape[0 if trans else 1] != inv.shape[0]:
                return False
            gr.set_array(node, 1, w * (inv[:, None] if trans else inv[None, :]))
            if len(node.input) > 2 and node.input[2]:
                if node.input[2] not in gr.inits:
                    return False
                gr.set_array(node, 2, np.broadcast_to(gr.array(node.input[2]), inv.shape) * inv)
            break
        elif op == "MatMul" and node.input[0] not in gr.inits and node.input[1] not in gr.inits:
            t = node.input[1]  # probabilities x V: V's channels pass through
        else:
            return False
    if bias is not None:
        node, i = bias
        gr.set_array(node, i, gr.array(node.input[i]) * inv)
    _remove_mul(gr, mul)
    return True


def fold(model: Any, linear: bool = True) -> tuple[int, int]:
    """Fold the ``SmoothQuant/`` Muls into their producers where exact (in place); returns
    (LayerNorm folds, Linear folds)."""
    gr = _Graph(model)
    ln = lin = 0
    for mul in [n for n in model.graph.node if n.name.startswith(PREFIX) and n.op_type == "Mul"]:
        if _fold_layernorm(gr, mul):
            ln += 1
        elif linear and _fold_linear(gr, mul):
            lin += 1
    return ln, lin


def _outputs(model: Any, data: Dataset, batch: int) -> list[np.ndarray]:
    session = _session(model)
    outs = [session.run(None, feed) for feed in _feeds(session, data, batch)]
    return [np.concatenate(parts) for parts in zip(*outs, strict=True)]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    for x, y in zip(a, b, strict=True):
        if not np.issubdtype(x.dtype, np.floating):
            if not np.array_equal(x, y):
                return False
        elif np.abs(x - y).max(initial=0.0) > 1e-4 * max(1.0, float(np.abs(x).max(initial=0))):
            return False
    return True


def smooth(
    src: Path,
    dst: Path,
    alpha: float,
    data: Dataset,
    batch: int = 8,
    scales: dict[str, np.ndarray] | None = None,
) -> Smoothing:
    """Write ``src`` rescaled with SmoothQuant's ``alpha`` (or the given ``scales``, keyed by
    the activation tensor: a trained export with its training's scales) to ``dst``."""
    import copy

    import onnx

    model = onnx.load(str(src))
    _node_names(model)
    groups = find_groups(model)
    rows = data.take(STAT_ROWS)
    if scales is None:
        maxima = channel_maxima(model, groups, rows, batch)
        scales = compute_scales(model, groups, maxima, alpha)
    done = apply_scales(model, groups, scales)
    record = Smoothing(alpha, done, sum(len(g.nodes) for g in groups if g.tensor in scales))
    record.rows, record.scales = len(rows), scales
    check = data.take(CHECK_ROWS)
    reference = _outputs(model, check, batch)
    for linear in (True, False):
        folded = copy.deepcopy(model)
        ln, lin = fold(folded, linear)
        if ln + lin == 0:
            break
        if _same(reference, _outputs(folded, check, batch)):
            model, record.folded_layernorm, record.folded_linear = folded, ln, lin
            break
        log.warning("SmoothQuant: folded graph differs (linear folds %s); not folded", linear)
    record.muls = len(smoothing_nodes(model))
    onnx.save(model, str(dst))
    return record


def smoothing_nodes(model: Any) -> list[str]:
    """The explicit ``SmoothQuant/`` Muls of a graph (a ModelProto or a path)."""
    if isinstance(model, str | Path):
        import onnx

        model = onnx.load(str(model), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type == "Mul" and n.name.startswith(PREFIX)]


def weight_scales(src: Path, scales: dict[str, np.ndarray]) -> dict[bytes, np.ndarray]:
    """The scale of each constant weight of ``src``'s rescaled groups, keyed by a digest of the
    weight's values as a [in, out] matrix (how a ``torch.nn.Linear``'s transposed weight is
    exported): QAT finds its Linears by value (``builder.qat.linear_scales``)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    out: dict[bytes, np.ndarray] = {}
    for g in find_groups(model):
        if g.tensor not in scales:
            continue
        for w, transposed in g.weights:
            a = numpy_helper.to_array(inits[w])
            out[digest(a.T if transposed else a)] = scales[g.tensor]
    return out


def digest(a: np.ndarray) -> bytes:
    a = np.ascontiguousarray(a, np.float32)
    return hashlib.sha256(f"{a.shape}".encode() + a.tobytes()).digest()
