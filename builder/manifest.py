"""The per-model manifest: what was built, how, and how each variant compares with FP32.

Written by the builder as ``<repository>/<model>.manifest.json``; read by the gateway (routing,
``auto`` policy), the load test (report tables) and the benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.errors import RepositoryError

MANIFEST_SUFFIX = ".manifest.json"
SCHEMA_VERSION = 1


@dataclass
class TensorSpec:
    """One model input or output. ``shape`` excludes the batch dimension; -1 is dynamic."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: list[int]

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TensorSpec.name must not be empty")
        self.shape = [int(d) for d in self.shape]


@dataclass
class VariantRecord:
    """One built precision variant of a model."""

    precision: str  # fp32 | fp16 | bf16 | int8 | int8-dynamic
    triton_name: str  # Triton model name, e.g. "digits_int8"
    file: str  # model file relative to the repository root
    engine: str = "onnxruntime"  # which engine runs the file (see server.engines)
    engine_options: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0
    # Quality vs the FP32 reference on the evaluation set:
    # accuracy (where labels exist), top1_agreement, cosine_mean, cosine_min, max_abs_error.
    quality: dict[str, float | None] = field(default_factory=dict)
    # Speed on the build host: latency_ms_p50 (batch 1), throughput (items/s at speed_batch).
    speed: dict[str, float] = field(default_factory=dict)
    # How the variant was made: calibration method/samples, quant types, blocked ops, kept nodes...
    details: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0

    @property
    def accuracy_loss(self) -> float | None:
        """Loss vs FP32 in points (0..100) of accuracy, or 1 - cosine when there are no labels."""
        return self.details.get("accuracy_loss")


@dataclass
class Manifest:
    model: str
    source: str
    task: str  # "classification" | "embedding"
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    accuracy_meaningful: bool = True
    notes: list[str] = field(default_factory=list)
    host: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, VariantRecord] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        data["inputs"] = [TensorSpec(**t) for t in data.get("inputs", [])]
        data["outputs"] = [TensorSpec(**t) for t in data.get("outputs", [])]
        data["variants"] = {k: VariantRecord(**v) for k, v in data.get("variants", {}).items()}
        return cls(**data)

    def path(self, repository: Path) -> Path:
        return manifest_path(repository, self.model)

    def save(self, repository: Path) -> Path:
        target = self.path(repository)
        atomic_write_text(target, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return target


def manifest_path(repository: Path, model: str) -> Path:
    return Path(repository) / f"{model}{MANIFEST_SUFFIX}"


def load_manifest(path: Path) -> Manifest:
    try:
        return Manifest.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise RepositoryError(f"cannot read manifest {path}: {e}") from e


def load_manifests(repository: Path) -> dict[str, Manifest]:
    """All manifests in a repository, keyed by logical model name."""
    repo = Path(repository)
    if not repo.is_dir():
        raise RepositoryError(f"model repository {repo} does not exist")
    out: dict[str, Manifest] = {}
    for p in sorted(repo.glob(f"*{MANIFEST_SUFFIX}")):
        m = load_manifest(p)
        out[m.model] = m
    return out


def atomic_write_text(target: Path, text: str) -> None:
    """Write a file through a temporary sibling and rename, so readers never see half a file."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, target)
    except OSError as e:
        raise RepositoryError(f"cannot write {target}: {e.strerror or e}") from e
