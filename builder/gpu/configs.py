"""Triton configs for GPU hosts, built through ``common.model_repository.build_model_config``.

Two ways to serve a variant on a GPU Triton:

* ``tensorrt_plan``: a TensorRT engine built here (``1/model.plan``). Plans only run on the GPU
  architecture they were built on, so when several compute capabilities are targeted the config
  maps each to its own file with ``cc_model_filenames`` (``"8.6" -> model_sm86.plan``).
* ``onnxruntime_onnx`` with the TensorRT execution accelerator: Triton's ONNX Runtime backend
  builds (and caches) the engines itself from the ONNX file at load time
  (``optimization.execution_accelerators.gpu_execution_accelerator`` named ``tensorrt``, with the
  parameter names of Triton's onnxruntime_backend README: ``precision_mode``,
  ``max_workspace_size_bytes``, ``trt_engine_cache_enable``/``trt_engine_cache_path``,
  ``trt_timing_cache_enable``/``trt_timing_cache_path`` and ``trt_profile_*_shapes``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from tritonclient.grpc import model_config_pb2 as mc

from builder.gpu.tensorrt_build import ShapeRange
from common.model_repository import ServingOptions, TensorSpec, build_model_config

TENSORRT_PLATFORM = "tensorrt_plan"
ONNXRUNTIME_PLATFORM = "onnxruntime_onnx"
PLAN_FILENAME = "model.plan"
PRECISION_MODES = {"fp32": "FP32", "fp16": "FP16", "int8": "INT8"}


def plan_filename(compute_capability: str | None = None) -> str:
    """``model.plan``, or ``model_sm86.plan`` for compute capability 8.6."""
    if not compute_capability:
        return PLAN_FILENAME
    return f"model_sm{compute_capability.replace('.', '')}.plan"


def plan_filenames(compute_capabilities: Sequence[str]) -> dict[str, str]:
    """Compute capability -> plan file name in the version folder ({} means ``model.plan``)."""
    ccs = sorted(set(compute_capabilities))
    if len(ccs) <= 1:
        return {}
    return {cc: plan_filename(cc) for cc in ccs}


def _gpu(serving: ServingOptions) -> ServingOptions:
    return dataclasses.replace(serving, instance_kind="KIND_GPU")


def _warmup_within_profile(cfg: mc.ModelConfig, profile: Mapping[str, ShapeRange] | None) -> None:
    """Warm-up dims must lie inside the engine's profile: use the profile's opt shape."""
    if not profile:
        return
    batched = cfg.max_batch_size > 0
    for warm in cfg.model_warmup:
        for name, inp in warm.inputs.items():
            if name in profile:
                opt = list(profile[name].opt)
                del inp.dims[:]
                inp.dims.extend(opt[1:] if batched else opt)


def tensorrt_plan_config(
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    serving: ServingOptions,
    compute_capabilities: Sequence[str] = (),
    profile: Mapping[str, ShapeRange] | None = None,
) -> mc.ModelConfig:
    """Config for a TensorRT engine on GPU instances (``platform: "tensorrt_plan"``)."""
    cfg = build_model_config(
        name,
        inputs,
        outputs,
        _gpu(serving),
        platform=TENSORRT_PLATFORM,
        default_model_filename=PLAN_FILENAME,
    )
    for cc, filename in plan_filenames(compute_capabilities).items():
        cfg.cc_model_filenames[cc] = filename
    _warmup_within_profile(cfg, profile)
    return cfg


def _shapes_param(profile: Mapping[str, ShapeRange], which: str) -> str:
    # ORT's format: "input1:1x16,input2:1x128"
    return ",".join(
        f"{name}:{'x'.join(str(d) for d in getattr(rng, which))}" for name, rng in profile.items()
    )


def onnxruntime_tensorrt_config(
    name: str,
    inputs: list[TensorSpec],
    outputs: list[TensorSpec],
    serving: ServingOptions,
    precision: str,
    engine_cache_path: str,
    timing_cache_path: str | None = None,
    profile: Mapping[str, ShapeRange] | None = None,
    workspace_bytes: int | None = None,
    precision_mode: str | None = None,
    extra_parameters: Mapping[str, str] | None = None,
) -> mc.ModelConfig:
    """Config for an ONNX variant on GPU Triton with ONNX Runtime's TensorRT accelerator.

    ``precision_mode`` defaults from the variant (fp32 FP32, fp16 FP16, int8 INT8: an ONNX with
    Q/DQ nodes needs INT8 enabled on TensorRT 10 builds of the execution provider).
    """
    mode = precision_mode or PRECISION_MODES.get(precision)
    if mode not in ("FP32", "FP16", "INT8"):
        raise ValueError(
            f"precision {precision!r} has no TensorRT precision_mode; give FP32, FP16 or INT8"
        )
    cfg = build_model_config(name, inputs, outputs, _gpu(serving), platform=ONNXRUNTIME_PLATFORM)
    params: dict[str, str] = {
        "precision_mode": mode,
        "trt_engine_cache_enable": "true",
        "trt_engine_cache_path": engine_cache_path,
    }
    if timing_cache_path:
        params["trt_timing_cache_enable"] = "true"
        params["trt_timing_cache_path"] = timing_cache_path
    if workspace_bytes:
        params["max_workspace_size_bytes"] = str(int(workspace_bytes))
    if profile:
        for which in ("min", "opt", "max"):
            params[f"trt_profile_{which}_shapes"] = _shapes_param(profile, which)
    params.update(extra_parameters or {})
    accel = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
    for key, value in params.items():
        accel.parameters[key] = value
    _warmup_within_profile(cfg, profile)
    return cfg
