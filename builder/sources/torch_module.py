"""``torch:MODULE:FACTORY`` — a Python factory returning a PyTorch module plus its input spec.

``MODULE`` is an importable module name (the current directory is searched too) or a path to a
``.py`` file; ``FACTORY`` is a callable in it taking no arguments. It returns either

* a :class:`TorchModelSpec` (or a dict with the same keys), or
* a tuple ``(module, inputs)`` where ``inputs`` is a list of :class:`TensorSpec`.

Input shapes exclude the batch dimension (always dynamic); -1 marks another dynamic dimension
(a sequence length, say). The module is called positionally with the inputs in order and
returns a tensor or a tuple of tensors. It is exported with ``torch.onnx.export(dynamo=False)``
at opset 17 with dynamic batch axes. torch is imported only when a model is loaded.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from builder.errors import SourceError
from builder.sources.base import Dataset, LoadedModel, SourceCapabilities, Trainable
from builder.sources.common import (
    export_torch_to_onnx,
    onnx_io_specs,
    sanitize_name,
    synthetic_dataset,
    task_for_outputs,
    with_data_note,
)
from common.model_repository import TensorSpec

CALIBRATION_SAMPLES = 64
EVALUATION_SAMPLES = 64


@dataclass
class TorchModelSpec:
    """What a ``torch:`` factory returns (a dict with these keys works too).

    module: the ``torch.nn.Module`` (put in eval mode by the exporter).
    inputs: one TensorSpec per positional argument; shape without batch, -1 = dynamic.
    output_names: names for the outputs (default ``output`` or ``output_0``, ``output_1``...).
    calibration / evaluation: real data (with labels for evaluation where known); seeded
        synthetic data is used for whichever is None.
    task: "classification" | "embedding"; default from the first output's rank.
    """

    module: Any
    inputs: list[TensorSpec]
    output_names: list[str] | None = None
    calibration: Dataset | None = None
    evaluation: Dataset | None = None
    task: str | None = None
    name: str | None = None
    max_batch_size: int = 32
    transformer: bool = False
    accuracy_meaningful: bool = True
    default_precisions: list[str] | None = None
    notes: list[str] = field(default_factory=list)


def _import_module(module_ref: str) -> Any:
    if module_ref.endswith(".py") or os.sep in module_ref:
        path = Path(module_ref).expanduser()
        if not path.is_file():
            raise SourceError(f"torch module file {path} does not exist")
        mod_name = f"_precision_serve_user_{sanitize_name(path.stem)}"
        spec = importlib.util.spec_from_file_location(mod_name, path)
        if spec is None or spec.loader is None:
            raise SourceError(f"cannot import {path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(mod_name, None)
            raise SourceError(f"importing {path} failed: {type(e).__name__}: {e}") from e
        return module
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module_ref)
    except ModuleNotFoundError as e:
        raise SourceError(f"cannot import torch module {module_ref!r}: {e}") from e
    except Exception as e:
        raise SourceError(f"importing {module_ref!r} failed: {type(e).__name__}: {e}") from e
    finally:
        if added:
            sys.path.remove(cwd)


def _coerce_spec(result: Any, where: str) -> TorchModelSpec:
    import torch

    if isinstance(result, dict):
        allowed = {f.name for f in fields(TorchModelSpec)}
        unknown = set(result) - allowed
        if unknown:
            raise SourceError(f"{where} returned unknown keys {sorted(unknown)}")
        try:
            result = TorchModelSpec(**result)
        except TypeError as e:
            raise SourceError(f"{where} returned an incomplete dict: {e}") from e
    elif isinstance(result, tuple) and len(result) == 2:
        result = TorchModelSpec(module=result[0], inputs=list(result[1]))
    if not isinstance(result, TorchModelSpec):
        raise SourceError(
            f"{where} must return a TorchModelSpec, a dict or (module, inputs); "
            f"got {type(result).__name__}"
        )
    if not isinstance(result.module, torch.nn.Module):
        raise SourceError(
            f"{where} returned module of type {type(result.module).__name__}, "
            "expected torch.nn.Module"
        )
    if not result.inputs or not all(isinstance(s, TensorSpec) for s in result.inputs):
        raise SourceError(f"{where} must give inputs as a non-empty list of TensorSpec")
    return result


def load_torch_spec(
    spec: TorchModelSpec, workdir: Path, name: str, source: str, seed: int = 0
) -> LoadedModel:
    """Export ``spec.module`` to ``workdir/<name>.onnx`` and describe it as a LoadedModel."""
    import onnx
    import torch

    notes = list(spec.notes)
    example = synthetic_dataset(spec.inputs, 2, seed=seed, dynamic_dim=8).inputs
    output_names = spec.output_names
    if output_names is None:
        with torch.no_grad():
            out = spec.module.eval()(*(torch.from_numpy(v) for v in example.values()))
        count = len(out) if isinstance(out, tuple | list) else 1
        output_names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    dynamic_axes: dict[str, dict[int, str]] = {}
    for s in spec.inputs:
        axes = {0: "batch"}
        axes.update({i + 1: f"{s.name}_dim{i + 1}" for i, d in enumerate(s.shape) if d < 0})
        dynamic_axes[s.name] = axes
    for o in output_names:
        dynamic_axes[o] = {0: "batch"}
    target = Path(workdir) / f"{name}.onnx"
    seconds = export_torch_to_onnx(spec.module, example, output_names, target, dynamic_axes)

    def export(module: Any, path: Path) -> None:
        export_torch_to_onnx(module, example, output_names, path, dynamic_axes)

    notes.append(f"exported from PyTorch to ONNX opset 17 in {seconds:.1f} s")
    inputs, outputs, _ = onnx_io_specs(onnx.load(str(target), load_external_data=False))
    calibration = spec.calibration
    if calibration is None:
        calibration = synthetic_dataset(inputs, CALIBRATION_SAMPLES, seed=seed)
    evaluation = spec.evaluation
    if evaluation is None:
        evaluation = synthetic_dataset(inputs, EVALUATION_SAMPLES, seed=seed + 1)
    kwargs: dict[str, Any] = {}
    if spec.default_precisions:
        kwargs["default_precisions"] = list(spec.default_precisions)
    return LoadedModel(
        name=name,
        source=source,
        task=spec.task or task_for_outputs(outputs),
        fp32_onnx=target,
        inputs=inputs,
        outputs=outputs,
        calibration=calibration,
        evaluation=evaluation,
        transformer=spec.transformer,
        accuracy_meaningful=spec.accuracy_meaningful,
        max_batch_size=spec.max_batch_size,
        notes=with_data_note(notes, calibration, evaluation),
        trainable=Trainable(spec.module, [s.name for s in spec.inputs], export),
        **kwargs,
    )


class TorchModuleSource:
    capabilities = SourceCapabilities()

    def load(self, reference: str, workdir: Path) -> LoadedModel:
        module_ref, sep, factory_name = reference.rpartition(":")
        if not sep or not module_ref or not factory_name:
            raise SourceError(
                f"torch source {reference!r} must look like torch:MODULE:FACTORY "
                "(MODULE importable or a .py file)"
            )
        module = _import_module(module_ref)
        factory = getattr(module, factory_name, None)
        if factory is None:
            raise SourceError(f"{module_ref} has no attribute {factory_name!r}")
        if not callable(factory):
            raise SourceError(f"{module_ref}:{factory_name} is not callable")
        where = f"factory {module_ref}:{factory_name}"
        try:
            result = factory()
        except Exception as e:
            raise SourceError(f"{where} raised {type(e).__name__}: {e}") from e
        spec = _coerce_spec(result, where)
        name = spec.name or sanitize_name(factory_name)
        return load_torch_spec(spec, workdir, name, f"torch:{reference}")
