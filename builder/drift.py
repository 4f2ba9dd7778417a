"""Per-node quantization error: which nodes' quantization hurts most (the budget search's guide).

Both models are run on a few evaluation rows with every intermediate tensor exposed as an
output. Quantizers keep the float graph's tensor names for the values a node produces (QDQ
inserts new names after them; dynamic INT8 and MatMulNBits end in the original name), so a
node's error is comparable by name: for each node of the float graph whose output exists in the
quantized graph, ``added_noise`` is the noise-to-signal power ratio vs FP32 at its output minus
that at its worst activation input. Ranking by that (not by the output's SQNR alone, which only
grows worse towards the end of the network, nor by a difference in dB, which makes the first
layer's tiny error look big) points at the node that adds the error.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from builder.sources.base import Dataset

CLEAN_DB = 120.0  # SQNR given to exact values (graph inputs, identical tensors)
FUSED_OPS = ("Relu", "Clip")  # float ops a quantizer may fold into the node before them


@dataclass
class NodeError:
    node: str
    op_type: str
    output_sqnr_db: float
    added_noise: float  # noise/signal power at the output minus at the worst input


def _expose_all(path: Path, out: Path) -> dict[str, str]:
    """Copy of ``path`` with every node output as a graph output; name -> producing op type."""
    import onnx

    model = onnx.load(str(path))
    existing = {o.name for o in model.graph.output}
    names: dict[str, str] = {}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in existing:
                model.graph.output.append(onnx.ValueInfoProto(name=name))
                existing.add(name)
            if name:
                names[name] = node.op_type
    onnx.save(model, str(out))
    return names


def _pairs(
    float_path: Path, float_ops: dict[str, str], quant_ops: dict[str, str]
) -> dict[str, str]:
    """Float tensor name -> the quantized graph's name for the same value.

    A name made by another op in the quantized graph is the same value (dynamic INT8 ends a
    MatMul in a Mul), except where the quantizer folded the float op away: QDQ drops a Relu
    after a MatMul (the quantization clips instead), and the MatMul's output takes the Relu's
    name. Then the MatMul's float output pairs with that name and the Relu's with none."""
    import onnx

    pairs = {
        n: n
        for n, op in float_ops.items()
        if n in quant_ops and (quant_ops[n] == op or op not in FUSED_OPS)
    }
    graph = onnx.load(str(float_path), load_external_data=False).graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    for name, op in float_ops.items():
        nxt = readers.get(name, [])
        if name in pairs or len(nxt) != 1 or nxt[0].op_type not in FUSED_OPS:
            continue
        folded = nxt[0].output[0]
        if quant_ops.get(folded) == op:
            pairs[name] = folded
    return pairs


def _sums(float_path: Path, quant_path: Path, data: Dataset, work: Path) -> dict[str, float]:
    """SQNR dB of every tensor the two graphs share (by name), accumulated over ``data``'s rows."""
    import onnxruntime as ort

    work.mkdir(parents=True, exist_ok=True)
    float_names = _expose_all(float_path, work / "float_all.onnx")
    quant_names = _expose_all(quant_path, work / "quant_all.onnx")
    shared = _pairs(float_path, float_names, quant_names)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    cpu = ["CPUExecutionProvider"]
    fs = ort.InferenceSession(str(work / "float_all.onnx"), opts, providers=cpu)
    qs = ort.InferenceSession(str(work / "quant_all.onnx"), opts, providers=cpu)
    signal = dict.fromkeys(shared, 0.0)
    noise = dict.fromkeys(shared, 0.0)
    for feed in data.batches(1):
        fo = dict(zip([o.name for o in fs.get_outputs()], fs.run(None, feed), strict=True))
        qo = dict(zip([o.name for o in qs.get_outputs()], qs.run(None, feed), strict=True))
        for n, qn in shared.items():
            f, q = np.asarray(fo[n]), np.asarray(qo[qn])
            if f.shape != q.shape or not np.issubdtype(f.dtype, np.floating):
                continue
            f64, q64 = f.astype(np.float64), q.astype(np.float64)
            signal[n] += float((f64**2).sum())
            noise[n] += float(((f64 - q64) ** 2).sum())
    return {n: _db(signal[n], noise[n]) for n in shared if signal[n] or noise[n]}


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return CLEAN_DB
    return min(CLEAN_DB, 10 * math.log10(max(signal, 1e-30) / noise))


def node_errors(
    float_path: Path,
    quant_path: Path,
    data: Dataset,
    work: Path,
    op_types: Collection[str] | None = None,
) -> list[NodeError]:
    """Nodes of the float graph (of ``op_types``, or all) by error introduced, worst first."""
    import onnx

    sqnr = _sums(float_path, quant_path, data, work)
    graph = onnx.load(str(float_path), load_external_data=False).graph
    producer = {o: node for node in graph.node for o in node.output if o}

    def known(tensor: str, seen: frozenset[str] = frozenset()) -> float:
        """SQNR of ``tensor``, else of the worst input of the node that made it (fused)."""
        if tensor in sqnr:
            return sqnr[tensor]
        node = producer.get(tensor)
        if node is None or tensor in seen:
            return CLEAN_DB  # graph input or initializer
        return min((known(i, seen | {tensor}) for i in node.input if i), default=CLEAN_DB)

    out: list[NodeError] = []
    for node in graph.node:
        if not node.name or (op_types is not None and node.op_type not in op_types):
            continue
        produced = [sqnr[o] for o in node.output if o in sqnr]
        if not produced:
            continue
        inputs = [known(i) for i in node.input if i]
        worst_in = min(inputs, default=CLEAN_DB)
        worst_out = min(produced)
        added = _noise_ratio(worst_out) - _noise_ratio(worst_in)
        out.append(NodeError(node.name, node.op_type, worst_out, added))
    return sorted(out, key=lambda e: -e.added_noise)


def _noise_ratio(db: float) -> float:
    """Noise power / signal power of a tensor with this SQNR."""
    return 10 ** (-db / 10)
