"""A decoder-LLM variant as a Triton model (python backend, decoupled):

<model>_<precision>/config.pbtxt     model_config_pb2.ModelConfig (text format)
<model>_<precision>/1/model.py       common/llm/triton_model.py, copied
<model>_<precision>/1/genai/         the onnxruntime-genai folder
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from common.llm import triton_model
from common.model_repository import (
    GENAI_FOLDER,
    PYTHON_MODEL_FILENAME,
    VERSION,
    TensorSpec,
    from_datatype,
    to_config_type,
)

MODEL_PY = Path(triton_model.__file__)


def _dtype(datatype: str) -> str:
    return from_datatype(datatype).name


def tensor_specs() -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The model's inputs and outputs (common/llm/triton_model.py) for the manifest."""
    inputs = [TensorSpec(n, _dtype(d), [1]) for n, d, _ in triton_model.INPUTS]
    outputs = [TensorSpec(n, _dtype(d), [1]) for n, d in triton_model.OUTPUTS]
    return inputs, outputs


def model_config(
    name: str, instance_count: int = 1, threads: int = 0, max_sequences: int = 0
) -> mc.ModelConfig:
    """The python-backend, decoupled config of one LLM variant (``max_batch_size`` 0: one
    request is one sequence; each instance runs up to ``max_sequences`` at once)."""
    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    cfg.model_transaction_policy.decoupled = True
    for tensor_name, datatype, optional in triton_model.INPUTS:
        cfg.input.append(
            mc.ModelInput(
                name=tensor_name,
                data_type=to_config_type(_dtype(datatype)),
                dims=[1],
                optional=optional,
            )
        )
    for tensor_name, datatype in triton_model.OUTPUTS:
        cfg.output.append(
            mc.ModelOutput(name=tensor_name, data_type=to_config_type(_dtype(datatype)), dims=[1])
        )
    cfg.instance_group.append(
        mc.ModelInstanceGroup(count=instance_count, kind=mc.ModelInstanceGroup.KIND_CPU)
    )
    if threads:
        cfg.parameters[triton_model.PARAM_THREADS].string_value = str(int(threads))
    if max_sequences:
        cfg.parameters[triton_model.PARAM_MAX_SEQUENCES].string_value = str(int(max_sequences))
    return cfg


def genai_dir(variant_dir: Path) -> Path:
    return Path(variant_dir) / VERSION / GENAI_FOLDER


def copy_model_py(variant_dir: Path) -> Path:
    target = Path(variant_dir) / VERSION / PYTHON_MODEL_FILENAME
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MODEL_PY, target)
    return target
