"""Triton ``config.pbtxt`` generation and parsing through Triton's own protobuf.

Configs are ``model_config_pb2.ModelConfig`` messages (from ``tritonclient``) written with
``text_format``; nothing here is a string template.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from common.model_repository.atomic import atomic_write_text
from common.model_repository.dtypes import to_config_type
from common.model_repository.errors import ConfigFileError
from common.model_repository.manifest import TensorSpec
from common.model_repository.naming import config_path


@dataclass
class ServingOptions:
    """How Triton (or the embedded upstream) should serve one variant."""

    max_batch_size: int = 32
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [8, 16])
    max_queue_delay_us: int = 500
    dynamic_batching: bool = True
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"  # KIND_CPU | KIND_GPU
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.max_batch_size < 0:
            raise ValueError(f"max_batch_size must be >= 0, got {self.max_batch_size}")
        if self.instance_count < 1:
            raise ValueError(f"instance_count must be >= 1, got {self.instance_count}")
        if self.instance_kind not in ("KIND_CPU", "KIND_GPU"):
            raise ValueError(
                f"instance_kind must be KIND_CPU or KIND_GPU, got {self.instance_kind}"
            )
        self.preferred_batch_sizes = [
            b for b in self.preferred_batch_sizes if 0 < b <= max(self.max_batch_size, 0)
        ]


def _io(spec: TensorSpec, cls: type) -> object:
    return cls(name=spec.name, data_type=to_config_type(spec.dtype), dims=list(spec.shape))


def _warmup_dims(spec: TensorSpec) -> list[int]:
    # Dynamic dimensions get a representative size for warm-up (e.g. sequence length 128).
    return [d if d > 0 else 128 for d in spec.shape]


def build_model_config(
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    serving: ServingOptions,
    platform: str = "onnxruntime_onnx",
    backend: str = "",
    default_model_filename: str = "",
    parameters: dict[str, str] | None = None,
) -> mc.ModelConfig:
    """A complete Triton ModelConfig for one variant."""
    cfg = mc.ModelConfig(name=name, max_batch_size=serving.max_batch_size)
    if platform:
        cfg.platform = platform
    if backend:
        cfg.backend = backend
    if default_model_filename:
        cfg.default_model_filename = default_model_filename
    cfg.input.extend(_io(s, mc.ModelInput) for s in inputs)
    cfg.output.extend(_io(s, mc.ModelOutput) for s in outputs)
    cfg.instance_group.append(
        mc.ModelInstanceGroup(
            count=serving.instance_count,
            kind=mc.ModelInstanceGroup.Kind.Value(serving.instance_kind),
        )
    )
    if serving.max_batch_size > 0 and serving.dynamic_batching:
        cfg.dynamic_batching.CopyFrom(
            mc.ModelDynamicBatching(
                preferred_batch_size=serving.preferred_batch_sizes,
                max_queue_delay_microseconds=serving.max_queue_delay_us,
            )
        )
    if serving.warmup:
        warm = mc.ModelWarmup(name="zeros", batch_size=1 if serving.max_batch_size > 0 else 0)
        for s in inputs:
            warm.inputs[s.name].CopyFrom(
                mc.ModelWarmup.Input(
                    data_type=to_config_type(s.dtype), dims=_warmup_dims(s), zero_data=True
                )
            )
        cfg.model_warmup.append(warm)
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = str(value)
    return cfg


def write_config(model_dir: Path, cfg: mc.ModelConfig) -> Path:
    path = config_path(model_dir)
    atomic_write_text(path, text_format.MessageToString(cfg))
    return path


def parse_config_text(text: str) -> mc.ModelConfig:
    cfg = mc.ModelConfig()
    try:
        text_format.Parse(text, cfg)
    except text_format.ParseError as e:
        raise ConfigFileError(f"invalid Triton config: {e}") from e
    return cfg


def read_config(model_dir: Path) -> mc.ModelConfig:
    path = config_path(model_dir)
    try:
        return parse_config_text(path.read_text())
    except OSError as e:
        raise ConfigFileError(f"cannot read {path}: {e.strerror or e}") from e


def serving_options_from_config(cfg: mc.ModelConfig) -> ServingOptions:
    """The serving options a config asks for (what the embedded upstream honours)."""
    count = sum(g.count or 1 for g in cfg.instance_group) or 1
    kind = (
        mc.ModelInstanceGroup.Kind.Name(cfg.instance_group[0].kind)
        if cfg.instance_group
        else "KIND_CPU"
    )
    has_db = cfg.HasField("dynamic_batching")
    return ServingOptions(
        max_batch_size=cfg.max_batch_size,
        preferred_batch_sizes=list(cfg.dynamic_batching.preferred_batch_size) if has_db else [],
        max_queue_delay_us=cfg.dynamic_batching.max_queue_delay_microseconds if has_db else 0,
        dynamic_batching=has_db,
        instance_count=count,
        instance_kind=kind if kind in ("KIND_CPU", "KIND_GPU") else "KIND_CPU",
        warmup=bool(cfg.model_warmup),
    )
