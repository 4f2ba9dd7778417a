"""Helpers shared by the model sources: names, tensor specs from ONNX, synthetic data, export.

torch is imported only inside :func:`export_torch_to_onnx`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from builder.errors import SourceError
from builder.sources.base import Dataset
from common.model_repository import TensorSpec

EXPORT_OPSET = 17
# Value used for a dynamic non-batch dimension (sequence length...) in synthetic data.
SYNTHETIC_DYNAMIC_DIM = 16
# Every data-provenance note starts with this, so a build can replace the source's note.
DATA_NOTE_PREFIX = "data: "


def is_synthetic(data: Dataset) -> bool:
    """Whether ``data`` is seeded noise from :func:`synthetic_dataset` (its description)."""
    return data.description.startswith("synthetic")


def data_note(calibration: Dataset, evaluation: Dataset) -> str | None:
    """What the INT8 calibration and the quality figures rest on, when that is seeded noise."""
    calibration_noise, evaluation_noise = is_synthetic(calibration), is_synthetic(evaluation)
    if calibration_noise and evaluation_noise:
        return (
            f"{DATA_NOTE_PREFIX}synthetic (seeded random noise, not real inputs): INT8 is "
            "calibrated, and every variant's quality (agreement, cosine) is measured, on it, so "
            "INT8 scales and quality figures are only indicative; --calibration-data DIR "
            "calibrates, and --eval-data DIR judges quality, on real data"
        )
    if evaluation_noise:
        return (
            f"{DATA_NOTE_PREFIX}INT8 is calibrated on {calibration.description or 'given data'}, "
            "but every variant's quality (agreement, cosine) is measured on synthetic data "
            "(seeded random noise, not real inputs), so quality figures are only indicative; "
            "--eval-data DIR judges quality on real data"
        )
    if calibration_noise:
        return (
            f"{DATA_NOTE_PREFIX}synthetic calibration (seeded random noise, not real inputs): INT8 "
            "scales are only indicative; --calibration-data DIR calibrates on real data"
        )
    return None


def with_data_note(notes: list[str], calibration: Dataset, evaluation: Dataset) -> list[str]:
    """``notes`` with its data-provenance note (re)computed for these datasets."""
    kept = [n for n in notes if not n.startswith(DATA_NOTE_PREFIX)]
    note = data_note(calibration, evaluation)
    return [*kept, note] if note else kept


def sanitize_name(stem: str) -> str:
    """A model name usable in Triton model names: lower case ``[a-z0-9_]``, not empty."""
    name = re.sub(r"[^a-z0-9_]+", "_", stem.lower()).strip("_")
    name = re.sub(r"_+", "_", name)
    return name or "model"


def is_image_like(spec: TensorSpec, batched: bool = True) -> bool:
    """Float NCHW input with 3 channels (shape without batch: [3, H, W])."""
    shape = spec.shape if batched else spec.shape[1:]
    return spec.dtype.startswith("float") and len(shape) == 3 and shape[0] == 3


def synthetic_dataset(
    specs: Sequence[TensorSpec],
    n: int,
    seed: int,
    batched: bool = True,
    description: str = "synthetic",
    dynamic_dim: int = SYNTHETIC_DYNAMIC_DIM,
) -> Dataset:
    """``n`` seeded random rows for ``specs``.

    Float inputs are N(0, 1), or uniform [0, 1) for image-like NCHW inputs with 3 channels;
    integer inputs are ones for ``*mask*`` inputs, zeros for ``*type_ids*`` and small integers
    (0..9) otherwise; bool inputs are False. Dynamic non-batch dims become ``dynamic_dim``.
    For an unbatched model (``batched=False``, the spec shape is the full shape) the rows are
    stacked along the first dimension, so ``batches(shape[0])`` yields whole model inputs.
    """
    rng = np.random.default_rng(seed)
    inputs: dict[str, np.ndarray] = {}
    for spec in specs:
        dims = [dynamic_dim if d < 0 else d for d in spec.shape]
        if batched:
            shape = [n, *dims]
        else:
            first = dims[0] if dims else 1
            shape = [n * first, *dims[1:]]
        dtype = np.dtype(spec.dtype)
        lname = spec.name.lower()
        if dtype.kind == "f":
            if is_image_like(spec, batched):
                arr = rng.random(shape, dtype=np.float32)
            else:
                arr = rng.standard_normal(shape, dtype=np.float32)
            arr = arr.astype(dtype)
        elif dtype.kind in "iu":
            if "mask" in lname:
                arr = np.ones(shape, dtype=dtype)
            elif "type_ids" in lname:
                arr = np.zeros(shape, dtype=dtype)
            else:
                arr = rng.integers(0, 10, size=shape).astype(dtype)
        elif dtype.kind == "b":
            arr = np.zeros(shape, dtype=bool)
        else:
            raise SourceError(
                f"cannot make synthetic data for input {spec.name!r} of dtype {spec.dtype}; "
                "pass --calibration-data"
            )
        inputs[spec.name] = arr
    return Dataset(inputs, None, description)


def _dim(d: Any) -> int:
    return int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else -1


def onnx_io_specs(model: Any) -> tuple[list[TensorSpec], list[TensorSpec], bool]:
    """(inputs, outputs, batched) of an ``onnx.ModelProto``.

    Graph inputs that are initializers (old exporters list weights as inputs) are skipped.
    ``batched`` is True when every input's first dim is dynamic; then shapes exclude it.
    Otherwise the shapes are the full shapes (Triton ``max_batch_size: 0``).
    """
    from onnx import helper

    init_names = {i.name for i in model.graph.initializer}

    def raw(values: Any) -> list[tuple[str, str, list[int]]]:
        out = []
        for v in values:
            if v.name in init_names:
                continue
            t = v.type
            if not t.HasField("tensor_type"):
                raise SourceError(f"graph input/output {v.name!r} is not a tensor")
            if not t.tensor_type.HasField("shape"):
                raise SourceError(f"graph input/output {v.name!r} declares no shape")
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.tensor_type.elem_type)).name
            dims = [_dim(d) for d in t.tensor_type.shape.dim]
            out.append((v.name, dtype, dims))
        return out

    ins, outs = raw(model.graph.input), raw(model.graph.output)
    if not ins:
        raise SourceError("the model has no graph inputs")
    if not outs:
        raise SourceError("the model has no graph outputs")
    batched = all(dims and dims[0] == -1 for _, _, dims in ins)

    def spec(items: list[tuple[str, str, list[int]]]) -> list[TensorSpec]:
        if batched:
            return [TensorSpec(n, d, dims[1:]) for n, d, dims in items]
        return [TensorSpec(n, d, dims) for n, d, dims in items]

    return spec(ins), spec(outs), batched


def task_for_outputs(outputs: Sequence[TensorSpec], batched: bool = True) -> str:
    """ "classification" when the first output is [batch, classes] (trailing 1-sized dims, as in
    Caffe2-era model-zoo exports' [N, 1000, 1, 1], allowed), else "embedding"."""
    dims = list(outputs[0].shape if batched else outputs[0].shape[1:])
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return "classification" if len(dims) == 1 else "embedding"


def export_torch_to_onnx(
    module: Any,
    example_inputs: dict[str, np.ndarray],
    output_names: Sequence[str],
    path: Path,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
    opset: int = EXPORT_OPSET,
) -> float:
    """Export ``module`` (called positionally with ``example_inputs`` in order) to ``path``.

    Uses the TorchScript exporter (``dynamo=False``) at opset 17; every input and output gets a
    dynamic batch axis unless ``dynamic_axes`` says otherwise. Returns the seconds taken.
    """
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(example_inputs)
    if dynamic_axes is None:
        dynamic_axes = {n: {0: "batch"} for n in [*names, *output_names]}
    args = tuple(torch.from_numpy(np.ascontiguousarray(example_inputs[n])) for n in names)
    module.eval()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                str(path),
                input_names=names,
                output_names=list(output_names),
                dynamic_axes=dynamic_axes,
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise SourceError(f"exporting {type(module).__name__} to ONNX failed: {e}") from e
    return time.perf_counter() - start
