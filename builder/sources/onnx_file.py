"""``onnx:PATH`` — any ONNX file, checked, upgraded to opset >= 13 where needed."""

from __future__ import annotations

from pathlib import Path

from builder.errors import SourceError
from builder.sources.base import LoadedModel, SourceCapabilities
from builder.sources.common import (
    onnx_io_specs,
    sanitize_name,
    synthetic_dataset,
    task_for_outputs,
    with_data_note,
)

# QDQ per-channel quantization needs opset >= 13; older models are converted to this opset.
MIN_OPSET = 13
CALIBRATION_SAMPLES = 64
EVALUATION_SAMPLES = 64
DEFAULT_MAX_BATCH = 32
_LARGE_MODEL_BYTES = 1_800_000_000


def default_opset(model: object) -> int:
    """The model's ``ai.onnx`` opset version (0 when it declares none)."""
    for op in model.opset_import:  # type: ignore[attr-defined]
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


class OnnxFileSource:
    """Reads and checks an ONNX file; data is seeded synthetic unless the user gives some."""

    capabilities = SourceCapabilities()

    def load(self, reference: str, workdir: Path) -> LoadedModel:
        import onnx

        path = Path(reference).expanduser()
        if not path.is_file():
            raise SourceError(f"ONNX file {path} does not exist or is not a file")
        try:
            model = onnx.load(str(path))
        except Exception as e:
            raise SourceError(f"cannot read ONNX file {path}: {e}") from e
        if not model.graph.node or not model.graph.output:
            raise SourceError(f"invalid ONNX file {path}: it holds no graph (not an ONNX model?)")
        try:
            onnx.checker.check_model(str(path))
        except Exception as e:
            raise SourceError(f"invalid ONNX file {path}: {e}") from e

        name = sanitize_name(path.stem)
        notes: list[str] = []
        fp32 = path
        opset = default_opset(model)
        if opset == 0:
            raise SourceError(f"invalid ONNX file {path}: it imports no ai.onnx opset")
        if opset < MIN_OPSET:
            fp32 = self._upgrade(model, path, Path(workdir) / f"{name}.onnx")
            model = onnx.load(str(fp32), load_external_data=False)
            notes.append(f"upgraded from opset {opset} to opset {MIN_OPSET}")

        try:
            inputs, outputs, batched = onnx_io_specs(model)
        except SourceError as e:
            raise SourceError(f"unsupported ONNX file {path}: {e}") from e
        if not batched:
            notes.append(
                "the first dimension of the inputs is fixed, so the model is served without "
                "batching (max_batch_size 0, shapes are full shapes)"
            )
        calibration = synthetic_dataset(
            inputs, CALIBRATION_SAMPLES, seed=0, batched=batched, description="synthetic"
        )
        evaluation = synthetic_dataset(
            inputs, EVALUATION_SAMPLES, seed=1, batched=batched, description="synthetic"
        )
        return LoadedModel(
            name=name,
            source=f"onnx:{reference}",
            task=task_for_outputs(outputs, batched),
            fp32_onnx=fp32,
            inputs=inputs,
            outputs=outputs,
            calibration=calibration,
            evaluation=evaluation,
            max_batch_size=DEFAULT_MAX_BATCH if batched else 0,
            notes=with_data_note(notes, calibration, evaluation),
        )

    @staticmethod
    def _upgrade(model: object, path: Path, target: Path) -> Path:
        import onnx
        from onnx import version_converter

        try:
            upgraded = version_converter.convert_version(model, MIN_OPSET)  # type: ignore[arg-type]
            onnx.checker.check_model(upgraded)
        except Exception as e:
            raise SourceError(
                f"cannot upgrade ONNX file {path} from opset {default_opset(model)} "
                f"to {MIN_OPSET}: {e}"
            ) from e
        target.parent.mkdir(parents=True, exist_ok=True)
        large = upgraded.ByteSize() > _LARGE_MODEL_BYTES
        onnx.save(
            upgraded,
            str(target),
            save_as_external_data=large,
            location=f"{target.name}.data" if large else None,
        )
        return target
