"""The per-model manifest: what was built, how, and how each variant compares with FP32.

Written by the builder as ``<repository>/<model>.manifest.json``; read by the gateway (routing,
``auto`` policy), the load test (report tables) and the benchmarks. The schema is a set of
pydantic dataclasses: a file is validated on load (unknown or mistyped fields are errors that
name the field), and ``schema_version`` is checked first, so a file written by an older or a
newer precision-serve gets a clear error instead of a half-read manifest.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic.dataclasses import dataclass

from common.model_repository.atomic import atomic_write_text
from common.model_repository.errors import ManifestError, RepositoryError, SchemaVersionError
from common.model_repository.naming import MANIFEST_SUFFIX, manifest_path

SCHEMA_VERSION = 1

# Where a variant's quality figures (``quality``, ``details.accuracy_loss``) were measured.
LABELLED = "labelled data"  # real rows with labels: accuracy vs FP32 is measured
UNLABELLED = "user data without labels"  # real rows (the user's or a demo's own), no labels
SYNTHETIC = "synthetic"  # seeded noise: agreement on inputs no user sends
QualitySource = Literal["labelled data", "user data without labels", "synthetic"]
QUALITY_SOURCES: tuple[str, ...] = (LABELLED, UNLABELLED, SYNTHETIC)
# Manifest.task of a decoder LLM: its variants are python-backend, decoupled Triton models
# (naming.GENAI_FOLDER holds the onnxruntime-genai folder), their records carry ``llm``.
LLM_TASK = "llm"

_STRICT = pydantic.ConfigDict(extra="forbid")


@dataclass(config=_STRICT)
class TensorSpec:
    """One model input or output. ``shape`` excludes the batch dimension; -1 is dynamic.

    ``max_shape`` (inputs): the largest value each dimension may take, the fixed ones as in
    ``shape`` (e.g. ``[512]`` for a sequence the model's position embeddings end at). The
    gateway refuses larger inputs before decoding them and, when every input of every model is
    bounded, sizes its gRPC message limit to the largest valid request (server/transports/request_bounds.py).
    None: unbounded (only ``--max-request-bytes`` limits it)."""

    name: str
    dtype: str  # numpy dtype name: "float32", "int64", ...
    shape: list[int]
    max_shape: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("TensorSpec.name must not be empty")
        if self.max_shape is not None:
            check_max_shape(self.name, self.shape, self.max_shape)


def check_max_shape(name: str, shape: list[int], max_shape: list[int]) -> None:
    """``max_shape`` fits ``shape``: same rank, fixed dims equal, dynamic ones >= 1."""
    if len(max_shape) != len(shape):
        raise ValueError(
            f"tensor {name!r}: max_shape {max_shape} has {len(max_shape)} dims, shape {shape} "
            f"has {len(shape)}"
        )
    for i, (dim, most) in enumerate(zip(shape, max_shape, strict=True)):
        if (dim != -1 and most != dim) or most < 1:
            want = "at least 1" if dim == -1 else f"{dim}, as in shape"
            raise ValueError(f"tensor {name!r}: max_shape dim {i} is {most}, expected {want}")


@dataclass(config=_STRICT)
class LlmSpeed:
    """A decoder LLM variant's speed on the build host with ``threads`` intra-op threads: the
    medians of several greedy generations of ``LlmModelRecord.output_tokens`` tokens after a
    prompt of ``LlmModelRecord.prompt_tokens`` tokens (builder/llm/speed.py)."""

    threads: int
    ttft_ms: float  # time to first token: the prompt's prefill and the first token
    itl_ms: float  # inter-token latency: mean time of each later token
    decode_tok_s: float  # 1000 / itl_ms: decode tokens per second of one sequence
    runs: int = 1


@dataclass(config=_STRICT)
class LlmVariantRecord:
    """A decoder LLM variant's quality vs its fp32 variant and its speed (``VariantRecord.llm``).

    Quality is measured on the model's evaluation text (``LlmModelRecord.eval_text``) in
    windows, from the full next-token distributions: ``ppl`` perplexity of the text,
    ``ppl_ratio`` ppl / fp32's ppl, ``kl_mean`` mean KL(fp32 || variant) in nats per position,
    ``top1_agreement`` share of positions whose most likely next token is fp32's."""

    ppl: float
    ppl_ratio: float = 1.0
    kl_mean: float = 0.0
    top1_agreement: float = 1.0
    eval_tokens: int = 0  # next-token predictions the figures average over
    speed: list[LlmSpeed] = field(default_factory=list)
    genai_precision: str = ""  # onnxruntime-genai builder's -p
    genai_options: dict[str, str] = field(default_factory=dict)  # its --extra_options

    def speed_at(self, threads: int) -> LlmSpeed | None:
        return next((s for s in self.speed if s.threads == threads), None)


@dataclass(config=_STRICT)
class LlmModelRecord:
    """What a decoder LLM's figures were measured on (``Manifest.llm``)."""

    architecture: str  # the Hugging Face architecture, e.g. "LlamaForCausalLM"
    context_length: int
    eval_text: str  # where the evaluation text came from (the builder's own or --eval-data)
    eval_window: int = 0  # tokens per evaluation window
    prompt_tokens: int = 0  # speed: prompt length
    output_tokens: int = 0  # speed: generated tokens per run
    reference_note: str = ""  # what fp32 is, where it is not the original weights


@dataclass(config=_STRICT)
class VariantRecord:
    """One built precision variant of a model."""

    precision: str  # fp32 | fp16 | bf16 | int8 | int8-dynamic
    triton_name: str  # Triton model name, e.g. "digits_int8" (naming.variant_name)
    file: str  # model file relative to the repository root
    engine: str = "onnxruntime"  # which engine runs the file (see common.engines)
    engine_options: dict[str, Any] = field(default_factory=dict)
    size_bytes: int = 0
    # Quality vs the FP32 reference on the evaluation set:
    # accuracy (where labels exist), top1_agreement, cosine_mean, cosine_min, max_abs_error.
    quality: dict[str, float | None] = field(default_factory=dict)
    # What ``quality`` was measured on (QUALITY_SOURCES); None in manifests written before the
    # field existed: Manifest.quality_source infers it.
    quality_source: QualitySource | None = None
    # Speed on the build host: latency_ms_p50 (batch 1), throughput (items/s at speed_batch).
    speed: dict[str, float] = field(default_factory=dict)
    # How the variant was made: calibration method/samples, quant types, blocked ops, kept nodes...
    details: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0
    # Decoder LLM variants only (Manifest.task "llm"): quality and speed; None otherwise.
    llm: LlmVariantRecord | None = None

    @property
    def accuracy_loss(self) -> float | None:
        """Loss vs FP32 in points (0..100) of accuracy, or 1 - cosine when there are no labels."""
        return self.details.get("accuracy_loss")


@dataclass(config=_STRICT)
class Manifest:
    model: str
    source: str
    task: str  # "classification" | "embedding" | "llm" (decoder LLM, python backend)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    max_batch_size: int
    accuracy_meaningful: bool = True
    notes: list[str] = field(default_factory=list)
    host: dict[str, Any] = field(default_factory=dict)
    variants: dict[str, VariantRecord] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    # Decoder LLMs only: what their quality and speed figures were measured on.
    llm: LlmModelRecord | None = None

    @property
    def is_llm(self) -> bool:
        return self.task == LLM_TASK

    def quality_source(self, precision: str) -> str:
        """Where ``precision``'s quality figures came from (one of QUALITY_SOURCES).

        Manifests written before ``VariantRecord.quality_source`` existed are read by what they
        do record: a ``data:`` note saying quality was measured on synthetic data, or an
        ``onnx:`` source (whose evaluation could only be seeded noise then), reads as synthetic;
        a recorded accuracy as labelled data; anything else as real data without labels (the
        builder has noted every synthetic evaluation set since it recorded the data at all).
        """
        record = self.variants[precision]
        if record.quality_source is not None:
            return record.quality_source
        noise_note = any(
            n.startswith("data: synthetic (") or "measured on synthetic data" in n
            for n in self.notes
        )
        if noise_note or self.source.startswith("onnx:"):
            return SYNTHETIC
        if record.quality.get("accuracy") is not None:
            return LABELLED
        return UNLABELLED

    # ---- (de)serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Validate a parsed manifest; raises ManifestError / SchemaVersionError."""
        if not isinstance(data, dict):
            raise ManifestError(f"a manifest is a JSON object, got {type(data).__name__}")
        check_schema_version(data.get("schema_version"))
        try:
            return _ADAPTER.validate_python(data)
        except pydantic.ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(top level)'}: {err['msg']}"
                for err in e.errors()
            )
            raise ManifestError(f"manifest of {data.get('model', '?')!r}: {problems}") from e

    def path(self, repository: Path) -> Path:
        return manifest_path(repository, self.model)

    def save(self, repository: Path) -> Path:
        target = self.path(repository)
        atomic_write_text(target, json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return target


_ADAPTER = pydantic.TypeAdapter(Manifest)


def check_schema_version(version: object) -> None:
    """Accept exactly the schema this program writes; name the way out otherwise."""
    if version == SCHEMA_VERSION:
        return
    if not isinstance(version, int) or isinstance(version, bool):
        raise SchemaVersionError(
            f"manifest has no valid schema_version (got {version!r}, expected {SCHEMA_VERSION})"
        )
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"manifest schema_version {version} is newer than this precision-serve reads "
            f"({SCHEMA_VERSION}): upgrade precision-serve"
        )
    raise SchemaVersionError(
        f"manifest schema_version {version} is older than this precision-serve reads "
        f"({SCHEMA_VERSION}): rebuild the model with `precision-build ... --force`"
    )


def load_manifest(path: Path) -> Manifest:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ManifestError(f"cannot read manifest {path}: {e}") from e
    try:
        return Manifest.from_dict(data)
    except ManifestError as e:
        raise type(e)(f"{path}: {e}") from e


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
