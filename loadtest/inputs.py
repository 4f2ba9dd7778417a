"""Request inputs for load tests, without torch: real evaluation rows when the builder wrote them.

The builder writes up to 64 held-out rows per model as ``<repository>/<model>.samples.npz``
(``builder.pipeline.write_samples``; labels under ``__labels__``). Without that file the inputs are
synthetic, generated from the manifest's input specs (or from the server's model metadata), and a
warning says so: latency then reflects the shapes but not the data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.model_repository import SAMPLES_LABELS_KEY, DtypeError, from_datatype, samples_path
from loadtest.errors import ConfigError

log = logging.getLogger(__name__)

DYNAMIC_DIM = 16  # length used for a -1 dimension in synthetic inputs


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str  # numpy dtype name
    shape: tuple[int, ...]  # without the batch dimension; -1 = dynamic


@dataclass
class SampleInputs:
    """Rows of every input (first dimension = row) and where they came from."""

    arrays: dict[str, np.ndarray]
    origin: str  # "samples" | "synthetic (manifest)" | "synthetic (server metadata)"

    def __post_init__(self) -> None:
        sizes = {len(a) for a in self.arrays.values()}
        if not self.arrays or len(sizes) != 1 or 0 in sizes:
            raise ConfigError(f"sample inputs need the same non-zero row count, got {sizes}")

    @property
    def rows(self) -> int:
        return len(next(iter(self.arrays.values())))

    def batches(self, batch_size: int, count: int = 16) -> list[dict[str, np.ndarray]]:
        """``count`` distinct batches of ``batch_size`` rows, cycling through the rows."""
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        out = []
        for i in range(min(count, max(1, self.rows))):
            idx = (np.arange(batch_size) + i * batch_size) % self.rows
            out.append({k: np.ascontiguousarray(v[idx]) for k, v in self.arrays.items()})
        return out


def read_samples(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files if k != SAMPLES_LABELS_KEY}


def synthetic(specs: list[InputSpec], rows: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """Random rows like ``specs``: floats ~ N(0, 1), masks = 1, other integers in [0, 100)."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for s in specs:
        shape = (rows, *(DYNAMIC_DIM if d < 0 else d for d in s.shape))
        dtype = np.dtype(s.dtype)
        if dtype.kind == "f":
            out[s.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind in "iu" and "mask" in s.name:
            out[s.name] = np.ones(shape, dtype)
        elif dtype.kind in "iu":
            out[s.name] = rng.integers(0, 100, shape).astype(dtype)
        elif dtype.kind == "b":
            out[s.name] = rng.integers(0, 2, shape).astype(bool)
        else:
            raise ConfigError(f"input {s.name!r}: cannot synthesise dtype {s.dtype}")
    return out


def manifest_specs(repository: Path, model: str) -> list[InputSpec] | None:
    """Input specs from ``<repository>/<model>.manifest.json``, or None when there is none."""
    from common.model_repository import load_manifest, manifest_path  # light: json + dataclasses

    path = manifest_path(Path(repository), model)
    if not path.is_file():
        return None
    manifest = load_manifest(path)
    return [InputSpec(t.name, t.dtype, tuple(t.shape)) for t in manifest.inputs]


def load_inputs(repository: Path | None, model: str) -> SampleInputs | None:
    """Real rows if the builder wrote them, else synthetic rows from the manifest, else None
    (the caller then asks the server for the model's metadata: see ``specs_from_metadata``)."""
    if repository is not None:
        path = samples_path(repository, model)
        if path.is_file():
            return SampleInputs(read_samples(path), "samples")
        specs = manifest_specs(repository, model)
        if specs is not None:
            log.warning(
                "%s not found: sending synthetic inputs generated from the manifest", path.name
            )
            return SampleInputs(synthetic(specs), "synthetic (manifest)")
    return None


def specs_from_metadata(inputs: list[tuple[str, str, list[int]]], batched: bool) -> list[InputSpec]:
    """InputSpecs from KServe model metadata (name, Triton datatype, shape incl. batch if any)."""
    out = []
    for name, datatype, shape in inputs:
        try:
            dtype = from_datatype(datatype)
        except DtypeError as e:
            raise ConfigError(f"input {name!r}: {e}") from None
        dims = tuple(int(d) for d in (shape[1:] if batched else shape))
        out.append(InputSpec(name, dtype.name, dims))
    return out
