"""Read a model repository (manifests + each variant's ``config.pbtxt``) into memory.

A logical model (``digits``) has one :class:`Variant` per built precision (``digits_int8``...).
The served interface of a variant comes from its ``config.pbtxt`` (what Triton would serve);
the manifest supplies the precision, engine, file, speed and quality records. A variant whose
config cannot be read is kept with ``problem`` set, so it reports unready instead of stopping
the whole gateway.

A variant has a declared :attr:`Variant.kind`: ``"tensor"`` (one response per request: the
ONNX/TensorRT models) or ``"llm"`` (a decoder served through onnxruntime-genai: the manifest's
engine is :data:`LLM_ENGINE`, its ``file`` the genai folder, and its config decoupled). The
transports and upstreams read the kind; nothing probes for it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from common.model_repository import (
    Manifest,
    RepositoryError,
    ServingOptions,
    TensorSpec,
    VariantRecord,
    build_model_config,
    from_config_type,
    load_manifests,
    read_config,
    serving_options_from_config,
    to_datatype,
)
from server.errors import ConfigError

# Most accurate first: used for defaults and for ordering listings.
PRECISION_ORDER = ["fp32", "bf16", "fp16", "int8-dynamic", "int8", "int4"]

LLM_ENGINE = "onnxruntime-genai"  # the manifest engine of decoder LLM variants
TENSOR = "tensor"  # kinds of variant (Variant.kind)
LLM = "llm"


@dataclass(frozen=True)
class TensorInfo:
    """A served input/output. ``shape`` excludes the batch dimension; -1 is dynamic."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    # inputs: the largest value of each dim (manifest ``max_shape``); None: unbounded
    max_shape: tuple[int, ...] | None = None

    @property
    def datatype(self) -> str:
        return to_datatype(self.dtype)


@dataclass
class Variant:
    """One servable precision variant (a Triton model)."""

    name: str  # Triton name, e.g. "digits_int8"
    model: str  # logical model, e.g. "digits"
    precision: str
    path: Path  # the model file
    record: VariantRecord
    config: mc.ModelConfig
    serving: ServingOptions
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    version: str = "1"
    problem: str | None = None  # why it cannot be served (unreadable config, missing file)
    kind: str = TENSOR  # TENSOR or LLM (module docstring)

    @property
    def decoupled(self) -> bool:
        """Triton's ``model_transaction_policy { decoupled: true }``: many responses per
        request (the LLM variants)."""
        return bool(self.config.model_transaction_policy.decoupled)

    @property
    def openai_name(self) -> str:
        """The name the OpenAI API lists for the variant: ``model:precision``."""
        return f"{self.model}:{self.precision}"

    @property
    def max_batch_size(self) -> int:
        return self.serving.max_batch_size

    def input(self, name: str) -> TensorInfo | None:
        return next((t for t in self.inputs if t.name == name), None)


@dataclass
class Model:
    """A logical model and its variants, keyed by precision."""

    name: str
    manifest: Manifest
    variants: dict[str, Variant] = field(default_factory=dict)

    def precisions(self) -> list[str]:
        known = [p for p in PRECISION_ORDER if p in self.variants]
        return known + sorted(p for p in self.variants if p not in PRECISION_ORDER)

    def reference(self) -> Variant:
        """The variant whose interface the logical model presents (fp32 when present)."""
        return self.variants[self.precisions()[0]]

    @property
    def kind(self) -> str:
        """Its variants' kind (one model's variants are all of one kind: load_repository)."""
        return self.reference().kind


@dataclass
class Repository:
    root: Path
    models: dict[str, Model]

    def variants(self) -> list[Variant]:
        return [v for m in self.models.values() for v in m.variants.values()]

    def variant(self, name: str) -> Variant | None:
        return next((v for v in self.variants() if v.name == name), None)

    def has_llm(self) -> bool:
        return any(v.kind == LLM for v in self.variants())


def _tensors_from_config(items: list, specs: list[TensorSpec]) -> list[TensorInfo]:
    """The config's tensors, with the manifest's ``max_shape`` where it has one of that name
    and rank (the config format has no place for it)."""
    bounds = {s.name: s.max_shape for s in specs if s.max_shape is not None}
    out = []
    for t in items:
        most = bounds.get(t.name)
        fits = most is not None and len(most) == len(t.dims)
        out.append(
            TensorInfo(
                t.name, from_config_type(t.data_type), tuple(t.dims), tuple(most) if fits else None
            )
        )
    return out


def _tensors_from_specs(specs: list[TensorSpec]) -> list[TensorInfo]:
    return [
        TensorInfo(
            s.name,
            np.dtype(s.dtype),
            tuple(s.shape),
            None if s.max_shape is None else tuple(s.max_shape),
        )
        for s in specs
    ]


def _confined(root: Path, manifest: Manifest, record: VariantRecord) -> Path:
    """The variant's model file; ConfigError when the manifest points outside the variant's
    folder (``../../etc/passwd``, an absolute path): a manifest cannot make the gateway read
    or serve other files. Lexical (symlinks placed in the repository are the operator's)."""
    folder = Path(os.path.normpath(root / record.triton_name))
    path = Path(os.path.normpath(root / record.file))
    inside_root = folder.is_relative_to(Path(os.path.normpath(root))) and folder != Path(
        os.path.normpath(root)
    )
    if not inside_root or not path.is_relative_to(folder) or path == folder:
        raise ConfigError(
            f"manifest of model {manifest.model!r}, variant {record.precision!r}: file "
            f"{record.file!r} is outside the variant folder {record.triton_name}/ of the "
            "repository"
        )
    return path


def kind_of(record: VariantRecord) -> str:
    """The kind the manifest declares for a variant: its engine says it."""
    return LLM if record.engine == LLM_ENGINE else TENSOR


def _load_variant(root: Path, manifest: Manifest, record: VariantRecord) -> Variant:
    problem = None
    kind = kind_of(record)
    path = _confined(root, manifest, record)
    try:
        config = read_config(root / record.triton_name)
        serving = serving_options_from_config(config)
        inputs = _tensors_from_config(list(config.input), manifest.inputs)
        outputs = _tensors_from_config(list(config.output), [])
    except (RepositoryError, KeyError, ValueError) as e:
        problem = f"config of {record.triton_name} unusable: {e}"
        serving = ServingOptions(max_batch_size=manifest.max_batch_size)
        config = build_model_config(record.triton_name, manifest.inputs, manifest.outputs, serving)
        inputs = _tensors_from_specs(manifest.inputs)
        outputs = _tensors_from_specs(manifest.outputs)
    if problem is None and kind == LLM:
        if not path.is_dir():
            problem = f"onnxruntime-genai folder {path} is missing"
        elif not config.model_transaction_policy.decoupled:
            problem = (
                f"config of {record.triton_name}: an {LLM_ENGINE} variant needs "
                "model_transaction_policy { decoupled: true }"
            )
    elif problem is None and not path.is_file():
        problem = f"model file {path} is missing"
    return Variant(
        name=record.triton_name,
        model=manifest.model,
        precision=record.precision,
        path=path,
        record=record,
        config=config,
        serving=serving,
        inputs=inputs,
        outputs=outputs,
        problem=problem,
        kind=kind,
    )


def load_repository(root: Path) -> Repository:
    """Read every manifest under ``root``; raises ConfigError when the repository is unusable."""
    root = Path(root)
    try:
        manifests = load_manifests(root)
    except RepositoryError as e:
        raise ConfigError(str(e)) from e
    if not manifests:
        raise ConfigError(f"model repository {root} holds no *.manifest.json (build a model first)")
    models: dict[str, Model] = {}
    for name, manifest in manifests.items():
        if not manifest.variants:
            raise ConfigError(f"manifest of model {name!r} lists no variants")
        model = Model(name=name, manifest=manifest)
        for record in manifest.variants.values():
            model.variants[record.precision] = _load_variant(root, manifest, record)
        kinds = sorted({v.kind for v in model.variants.values()})
        if len(kinds) > 1:
            raise ConfigError(
                f"manifest of model {name!r} mixes variant kinds {kinds} (engine "
                f"{LLM_ENGINE!r} for some variants only)"
            )
        models[name] = model
    names = [v.name for m in models.values() for v in m.variants.values()]
    clash = sorted(set(names) & set(models))
    if clash:
        raise ConfigError(f"variant name(s) {clash} clash with logical model names")
    return Repository(root=root, models=models)


def add_new_variants(repository: Repository, model: str) -> list[Variant]:
    """Re-read ``model``'s manifest and add the variants it lists that are not known yet (the
    builder added a precision after start-up); returns them. Known variants are kept as they
    are (their sessions may be serving). ConfigError when the manifest cannot be read."""
    try:
        manifest = load_manifests(repository.root).get(model)
    except RepositoryError as e:
        raise ConfigError(str(e)) from e
    current = repository.models[model]
    if manifest is None:
        return []
    taken = set(repository.models) | {v.name for v in repository.variants()}
    added = []
    for record in manifest.variants.values():
        if record.precision in current.variants or record.triton_name in taken:
            continue
        variant = _load_variant(repository.root, manifest, record)
        current.variants[record.precision] = variant
        added.append(variant)
    if added:
        current.manifest = manifest
    return added


def find_in_manifests(repository: Repository, name: str) -> str | None:
    """The known logical model whose manifest (as on disk now) lists a variant called ``name``."""
    try:
        manifests = load_manifests(repository.root)
    except RepositoryError as e:
        raise ConfigError(str(e)) from e
    for model, manifest in manifests.items():
        if model in repository.models and any(
            r.triton_name == name for r in manifest.variants.values()
        ):
            return model
    return None
