"""Derive, from a standard repository, one that the ``nvidia-pytriton`` Triton binary can serve.

The standard repository (platform ``onnxruntime_onnx``) is what a Triton container serves as is.
The wheel's binary has only the python backend, so each variant becomes a python-backend model
running :mod:`server.launcher.python_model`: the derived ``config.pbtxt`` is a protobuf copy of the
standard one (same name, inputs, outputs, ``max_batch_size``, dynamic batching, instance groups,
warm-up) with ``backend: "python"``, no ``platform``, and parameters naming the engine, its
options and the model file from the manifest. The standard repository is never modified.

A decoder LLM's variants (manifest task ``llm``) are python-backend models already: their config
is copied as is, with the genai folder's absolute path and the threads in ``parameters``, and
``model.py`` is the package's common/llm/triton_model.py.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from common.llm import triton_model
from common.model_repository import (
    LLM_TASK,
    RepositoryError,
    VariantRecord,
    load_manifests,
    read_config,
    write_config,
)
from server.launcher import python_model
from server.launcher.errors import TritonRepositoryError

MODEL_PY = Path(python_model.__file__)
LLM_MODEL_PY = Path(triton_model.__file__)
MARKER = ".precision-serve-derived"  # only folders holding it are ever replaced


@dataclass(frozen=True)
class DerivedModel:
    name: str  # Triton name, e.g. "digits_int8"
    model: str  # logical model
    precision: str
    version: str


def derive_config(
    standard: mc.ModelConfig, record: VariantRecord, model_file: Path, threads: int = 1
) -> mc.ModelConfig:
    """The python-backend config for one variant, copied from its standard config."""
    cfg = mc.ModelConfig()
    cfg.CopyFrom(standard)
    cfg.ClearField("platform")
    cfg.ClearField("default_model_filename")
    cfg.backend = "python"
    params = {
        python_model.PARAM_ENGINE: record.engine,
        python_model.PARAM_ENGINE_OPTIONS: json.dumps(record.engine_options, sort_keys=True),
        python_model.PARAM_MODEL_FILE: str(Path(model_file).resolve()),
        python_model.PARAM_THREADS: str(int(threads)),
    }
    for key, value in params.items():
        cfg.parameters[key].string_value = value
    return cfg


def derive_llm_config(
    standard: mc.ModelConfig, genai_folder: Path, threads: int = 1
) -> mc.ModelConfig:
    """An LLM variant's config (python backend, decoupled already) pointing at its folder."""
    cfg = mc.ModelConfig()
    cfg.CopyFrom(standard)
    cfg.parameters[triton_model.PARAM_GENAI_FOLDER].string_value = str(genai_folder.resolve())
    cfg.parameters[triton_model.PARAM_THREADS].string_value = str(int(threads))
    return cfg


def _replaceable(repository: Path, target: Path) -> None:
    """Refuse to delete anything but an earlier derived repository (or an empty folder)."""
    resolved = target.resolve()
    if resolved == repository or resolved in repository.parents or repository in resolved.parents:
        raise TritonRepositoryError(
            f"derived repository {target} must be outside the model repository {repository}"
        )
    if target.exists():
        if not target.is_dir():
            raise TritonRepositoryError(f"{target} exists and is not a folder")
        if any(target.iterdir()) and not (target / MARKER).exists():
            raise TritonRepositoryError(
                f"{target} is not empty and was not written by precision-serve; "
                "choose an empty or new folder"
            )


def _version_of(record: VariantRecord) -> str:
    """The version folder of the variant file (``digits_int8/1/model.onnx`` -> ``1``)."""
    parts = Path(record.file).parts
    if len(parts) >= 3 and parts[0] == record.triton_name and parts[1].isdigit():
        return parts[1]
    return "1"


def derive_repository(repository: Path, target: Path, threads: int = 1) -> list[DerivedModel]:
    """Write the derived repository into ``target`` (replacing what is there)."""
    repository = Path(repository).resolve()
    target = Path(target)
    try:
        manifests = load_manifests(repository)
    except RepositoryError as e:
        raise TritonRepositoryError(str(e)) from e
    if not manifests:
        raise TritonRepositoryError(f"model repository {repository} holds no *.manifest.json")
    _replaceable(repository, target)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    (target / MARKER).write_text(
        f"derived from {repository} by precision-serve; replaced on start\n"
    )
    derived: list[DerivedModel] = []
    for manifest in manifests.values():
        llm = manifest.task == LLM_TASK
        for record in manifest.variants.values():
            model_file = repository / record.file
            if not (model_file.is_dir() if llm else model_file.is_file()):
                raise TritonRepositoryError(
                    f"variant {record.triton_name}: {model_file} is missing"
                )
            try:
                standard = read_config(repository / record.triton_name)
            except RepositoryError as e:
                raise TritonRepositoryError(f"variant {record.triton_name}: {e}") from e
            if standard.name != record.triton_name:
                raise TritonRepositoryError(
                    f"{record.triton_name}/config.pbtxt names model {standard.name!r}"
                )
            version = _version_of(record)
            out_dir = target / record.triton_name
            if llm:
                write_config(out_dir, derive_llm_config(standard, model_file, threads))
            else:
                write_config(out_dir, derive_config(standard, record, model_file, threads))
            (out_dir / version).mkdir(parents=True)
            shutil.copy2(LLM_MODEL_PY if llm else MODEL_PY, out_dir / version / "model.py")
            derived.append(
                DerivedModel(record.triton_name, manifest.model, record.precision, version)
            )
    return derived
