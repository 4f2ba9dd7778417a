"""Calibration data: the reader ONNX Runtime consumes, user-supplied data (calibration rows and
``--eval-data`` evaluation rows, one file format), and the cache key."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from builder.errors import CalibrationDataError
from builder.sources.base import Dataset
from common.model_repository import TensorSpec

METHODS = ("minmax", "entropy", "percentile")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".pgm", ".ppm")
# Optional class labels in user data: an array ``labels`` in an .npz, or a file ``labels.npy``.
LABELS_NAME = "labels"


def ort_method(method: str):
    from onnxruntime.quantization import CalibrationMethod

    table = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    try:
        return table[method]
    except KeyError:
        raise CalibrationDataError(
            f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}"
        ) from None


class DatasetReader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over a Dataset, in small batches."""

    def __init__(self, data: Dataset, batch_size: int = 8) -> None:
        self.data = data
        self.batch_size = batch_size
        self._it: Iterator[dict[str, np.ndarray]] | None = None

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._it is None:
            self._it = self.data.batches(self.batch_size)
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.data.batches(self.batch_size)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def set_range(self, start_index: int, end_index: int) -> None:
        sub = {
            k: v[start_index * self.batch_size : end_index * self.batch_size]
            for k, v in self.data.inputs.items()
        }
        self._it = Dataset(sub).batches(self.batch_size)


def cache_key(model_path: Path, data: Dataset, method: str, extra: str = "") -> str:
    """A hash of the model bytes, the calibration data and the method."""
    h = hashlib.sha256()
    h.update(Path(model_path).read_bytes())
    for name in sorted(data.inputs):
        arr = np.ascontiguousarray(data.inputs[name])
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(arr.shape).encode())
        h.update(arr.tobytes())
    h.update(method.encode())
    h.update(extra.encode())
    return h.hexdigest()[:24]


# ---- user-supplied calibration data ---------------------------------------------------------


def _check(
    spec: TensorSpec, arr: np.ndarray, origin: str, what: str = "calibration data"
) -> np.ndarray:
    """Validate one input's rows against its spec; returns the array with the spec's dtype."""
    want = np.dtype(spec.dtype)
    if arr.ndim == len(spec.shape):  # a single sample: add the batch dimension
        arr = arr[None, ...]
    if arr.ndim != len(spec.shape) + 1:
        raise CalibrationDataError(
            f"{what} {origin}: input {spec.name!r} expected shape "
            f"[N, {', '.join(map(str, spec.shape))}], got {list(arr.shape)}"
        )
    for i, (want_d, got_d) in enumerate(zip(spec.shape, arr.shape[1:], strict=True)):
        if want_d > 0 and want_d != got_d:
            raise CalibrationDataError(
                f"{what} {origin}: input {spec.name!r} dimension {i + 1} expected "
                f"{want_d}, got {got_d} (shape {list(arr.shape)})"
            )
    if arr.dtype.kind != want.kind:
        raise CalibrationDataError(
            f"{what} {origin}: input {spec.name!r} expected dtype {want.name}, got {arr.dtype.name}"
        )
    return arr.astype(want, copy=False)


def _load_image(path: Path, spec: TensorSpec) -> np.ndarray:
    from PIL import Image

    if len(spec.shape) != 3:
        raise CalibrationDataError(
            f"calibration image {path.name}: input {spec.name!r} is not an image tensor "
            f"(shape {spec.shape}; expected [C, H, W])"
        )
    c, h, w = spec.shape
    try:
        img = Image.open(path).convert("L" if c == 1 else "RGB")
    except OSError as e:
        raise CalibrationDataError(f"cannot read calibration image {path}: {e}") from e
    if h > 0 and w > 0:
        img = img.resize((w, h))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr.astype(np.dtype(spec.dtype))


def load_calibration_data(path: Path, inputs: list[TensorSpec]) -> Dataset:
    """Calibration rows from a folder (or a single file) of .npz, .npy or images.

    - ``.npz``: one array per input name, each ``[N, ...]``.
    - ``.npy``: single-input models; each file is one sample or ``[N, ...]`` rows.
    - images: single image input ``[C, H, W]``; resized, scaled to [0, 1].

    Labels (see :func:`load_eval_data`) are read and checked but calibration does not use them.
    """
    return load_user_data(path, inputs, "calibration data")


def load_eval_data(path: Path, inputs: list[TensorSpec]) -> Dataset:
    """``--eval-data``: evaluation rows in the calibration data's format, with optional class
    labels (an ``labels`` array in each .npz, or a ``labels.npy`` file next to the rows)."""
    return load_user_data(path, inputs, "evaluation data")


def _read_npz(f: Path, what: str) -> dict[str, np.ndarray]:
    try:
        with np.load(f) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CalibrationDataError(f"cannot read {what} file {f}: {e}") from e


def _read_npy(f: Path, what: str) -> np.ndarray:
    try:
        return np.load(f, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CalibrationDataError(f"cannot read {what} file {f}: {e}") from e


def _check_labels(labels: np.ndarray, origin: str, what: str) -> np.ndarray:
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise CalibrationDataError(
            f"{what} {origin}: labels expected a 1-D integer array (class index per row), "
            f"got {labels.dtype.name} of shape {list(labels.shape)}"
        )
    return labels.astype(np.int64)


def load_user_data(path: Path, inputs: list[TensorSpec], what: str) -> Dataset:
    """Rows (and optional labels) from a folder or a single file; ``what`` names the data in
    errors ("calibration data", "evaluation data")."""
    path = Path(path)
    if not path.exists():
        raise CalibrationDataError(f"{what} {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    by_name = {s.name: s for s in inputs}
    rows: dict[str, list[np.ndarray]] = {s.name: [] for s in inputs}
    labels: list[np.ndarray] = []
    for f in files:
        suffix = f.suffix.lower()
        if suffix == ".npz":
            arrays = _read_npz(f, what)
            missing = sorted(set(by_name) - set(arrays))
            if missing:
                raise CalibrationDataError(
                    f"{what} file {f.name} lacks input(s) {', '.join(missing)} "
                    f"(has {', '.join(sorted(arrays)) or 'nothing'})"
                )
            for name, spec in by_name.items():
                rows[name].append(_check(spec, arrays[name], f.name, what))
            if LABELS_NAME in arrays and LABELS_NAME not in by_name:
                labels.append(_check_labels(arrays[LABELS_NAME], f.name, what))
        elif suffix == ".npy" and f.stem == LABELS_NAME and LABELS_NAME not in by_name:
            labels.append(_check_labels(_read_npy(f, what), f.name, what))
        elif suffix == ".npy" or suffix in IMAGE_SUFFIXES:
            if len(inputs) != 1:
                raise CalibrationDataError(
                    f"{what} file {f.name}: the model has {len(inputs)} inputs; use .npz "
                    f"files with arrays named {', '.join(by_name)}"
                )
            spec = inputs[0]
            arr = _read_npy(f, what) if suffix == ".npy" else _load_image(f, spec)
            rows[spec.name].append(_check(spec, arr, f.name, what))
    if not any(rows.values()):
        raise CalibrationDataError(f"{what} {path} holds no .npz, .npy or image files")
    data = {k: np.concatenate(v, axis=0) for k, v in rows.items()}
    counts = {k: len(v) for k, v in data.items()}
    if len(set(counts.values())) != 1:
        raise CalibrationDataError(f"{what}: inputs have different row counts: {counts}")
    label_rows = np.concatenate(labels) if labels else None
    n = next(iter(counts.values()))
    if label_rows is not None and len(label_rows) != n:
        raise CalibrationDataError(
            f"{what} {path}: {len(label_rows)} labels for {n} rows (one label per row, or none)"
        )
    kind = "labelled user data" if label_rows is not None else "user data"
    return Dataset(data, label_rows, description=f"{kind} from {path}")
