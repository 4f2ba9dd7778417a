"""``precision-build MODEL --target gpu [--configs-only]``: the GPU models for a built repository.

For each precision TensorRT can take (fp32, fp16, int8) this writes, next to the CPU variants:

* ``<model>_<precision>_trt/``: ``config.pbtxt`` (``tensorrt_plan``, KIND_GPU), ``1/model.onnx``
  (the file TensorRT consumes) and, unless ``configs_only``, ``1/model.plan`` (or
  ``1/model_sm86.plan`` per compute capability when several are targeted);
* ``<model>_<precision>_ort_trt/``: ``config.pbtxt`` (``onnxruntime_onnx``, KIND_GPU, TensorRT
  execution accelerator) and ``1/model.onnx``.

FP32 and FP16 reuse the ONNX variants as they are (the FP16 file is already strongly typed FP16).
INT8 needs symmetric signed Q/DQ: the CPU ``int8`` file is reused only if it already is; otherwise
it is quantized again from FP32 with :func:`builder.gpu.quant.quantize_for_tensorrt`, which needs
the calibration data. What was written, and the engine metadata (TensorRT version, GPU, compute
capability) go into ``details["gpu"]`` of the variant's manifest record. GPU models are not
manifest variants: the CPU gateway never tries to load them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.gpu.configs import (
    PRECISION_MODES,
    onnxruntime_tensorrt_config,
    plan_filename,
    plan_filenames,
    tensorrt_plan_config,
)
from builder.gpu.device import GpuInfo, check_gpu_available
from builder.gpu.errors import GpuUnavailableError, GpuVariantError
from builder.gpu.quant import quantize_for_tensorrt, tensorrt_qdq_problems
from builder.gpu.tensorrt_build import (
    DEFAULT_DIM_RANGE,
    TIMING_CACHE_DIR,
    EngineBuildOptions,
    ShapeRange,
    file_sha256,
    profile_shapes,
    timing_cache_path,
)
from builder.sources.base import Dataset
from common.model_repository import (
    Manifest,
    RepositoryError,
    ServingOptions,
    VariantRecord,
    read_config,
    serving_options_from_config,
    write_config,
)

GPU_PRECISIONS = tuple(PRECISION_MODES)  # fp32, fp16, int8
BACKENDS = ("tensorrt_plan", "onnxruntime")
ONNX_NAME = "model.onnx"

__all__ = [
    "GpuTargetOptions",
    "GpuTargetResult",
    "GpuVariantResult",
    "build_gpu_target",
    "check_gpu_available",
]


@dataclass
class GpuTargetOptions:
    """What ``--target gpu`` builds. All fields have CLI-friendly defaults."""

    precisions: list[str] | None = None  # None: every fp32/fp16/int8 variant in the manifest
    backends: tuple[str, ...] = BACKENDS
    # Compute capabilities ("8.6", "9.0") to list in cc_model_filenames; the build host's own is
    # always added when engines are built.
    compute_capabilities: list[str] = field(default_factory=list)
    opt_batch_size: int | None = None
    dim_ranges: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    default_dim_range: tuple[int, int, int] | None = DEFAULT_DIM_RANGE
    workspace_bytes: int | None = None
    builder_optimization_level: int | None = None
    calibration_method: str = "minmax"
    force: bool = False  # rebuild engines even when the recorded one matches
    # Where Triton sees the repository (e.g. "/models" in a container); ONNX Runtime's TensorRT
    # engine/timing cache paths in the configs are absolute paths under it.
    server_repository: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.backends) - set(BACKENDS)
        if unknown:
            raise ValueError(f"unknown GPU backend(s) {sorted(unknown)}; known: {list(BACKENDS)}")


@dataclass
class GpuVariantResult:
    precision: str
    backend: str  # "tensorrt_plan" | "onnxruntime"
    triton_name: str
    # built | reused | configs-only (plan not built) | config (ORT builds at load) | skipped
    status: str
    reason: str = ""

    def line(self) -> str:
        extra = f" ({self.reason})" if self.reason else ""
        return f"{self.triton_name:<32} {self.backend:<14} {self.status}{extra}"


@dataclass
class GpuTargetResult:
    manifest: Manifest
    results: list[GpuVariantResult]
    gpu: GpuInfo | None = None

    def summary_lines(self) -> list[str]:
        if self.gpu is None:
            head = "GPU: none (configs only, no engines built)"
        else:
            head = f"GPU: {self.gpu.name} (compute capability {self.gpu.compute_capability})"
        return [head] + [r.line() for r in self.results]


def _link_or_copy(src: Path, dst: Path) -> None:
    """Put ``src`` at ``dst`` atomically (hard link where possible, else a copy)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and dst.samefile(src):
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", dir=dst.parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise RepositoryError(f"cannot write {dst}: {e.strerror or e}") from e


def _serving(manifest: Manifest, repository: Path, record: VariantRecord) -> ServingOptions:
    """The CPU variant's serving options (batching, warm-up) where its config exists."""
    try:
        return serving_options_from_config(read_config(repository / record.triton_name))
    except RepositoryError:
        return ServingOptions(max_batch_size=manifest.max_batch_size)


def _manifest_profile(
    manifest: Manifest, serving: ServingOptions, options: GpuTargetOptions
) -> dict[str, ShapeRange]:
    batched = serving.max_batch_size > 0
    shapes = [(t.name, ([-1] if batched else []) + list(t.shape)) for t in manifest.inputs]
    return profile_shapes(shapes, _engine_options(serving, options, None))


def _engine_options(
    serving: ServingOptions, options: GpuTargetOptions, cache: Path | None
) -> EngineBuildOptions:
    return EngineBuildOptions(
        max_batch_size=serving.max_batch_size,
        opt_batch_size=options.opt_batch_size,
        dim_ranges=dict(options.dim_ranges),
        default_dim_range=options.default_dim_range,
        workspace_bytes=options.workspace_bytes,
        builder_optimization_level=options.builder_optimization_level,
        timing_cache=cache,
    )


def _int8_source(
    manifest: Manifest,
    repository: Path,
    dst: Path,
    calibration: Dataset | None,
    options: GpuTargetOptions,
) -> dict[str, Any]:
    """Write the symmetric INT8 Q/DQ file to ``dst``; return how it was made."""
    record = manifest.variants["int8"]
    cpu_file = repository / record.file
    if cpu_file.is_file() and not tensorrt_qdq_problems(cpu_file):
        _link_or_copy(cpu_file, dst)
        return {"source": record.file, "requantized": False}
    if calibration is None:
        why = tensorrt_qdq_problems(cpu_file)[0] if cpu_file.is_file() else "file missing"
        raise GpuVariantError(
            f"the int8 variant of {manifest.model} is not TensorRT-ready ({why}) and no "
            "calibration data was given to quantize it again with symmetric INT8"
        )
    from builder.cache import calibration_cache_dir
    from builder.calibration import cache_key
    from builder.precisions.int8 import preprocess

    fp32 = repository / manifest.variants["fp32"].file
    cache_dir = calibration_cache_dir(manifest.model)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8-work-", dir=dst.parent) as work:
        # Same pre-processing as the CPU INT8, so its FP32-kept node names match.
        pre = preprocess(fp32, Path(work) / "int8_pre.onnx")
        key = cache_key(pre, calibration, options.calibration_method, extra="tensorrt-symmetric")
        details = quantize_for_tensorrt(
            pre,
            dst,
            calibration,
            method=options.calibration_method,
            nodes_to_exclude=record.details.get("fp32_kept_nodes", []) or [],
            cache_path=cache_dir / f"tensorrt-{options.calibration_method}-{key}.json",
        )
    return {"source": manifest.variants["fp32"].file, "requantized": True, "quantization": details}


def _onnx_for(
    precision: str,
    manifest: Manifest,
    repository: Path,
    dst: Path,
    calibration: Dataset | None,
    options: GpuTargetOptions,
) -> dict[str, Any]:
    if precision == "int8":
        return _int8_source(manifest, repository, dst, calibration, options)
    record = manifest.variants[precision]
    src = repository / record.file
    if not src.is_file():
        raise GpuVariantError(f"variant file {src} is missing; build {precision} first")
    _link_or_copy(src, dst)
    return {"source": record.file, "requantized": False}


def _skip_reason(manifest: Manifest, precision: str) -> str | None:
    if precision not in GPU_PRECISIONS:
        return f"TensorRT takes {', '.join(GPU_PRECISIONS)} here, not {precision}"
    if precision not in manifest.variants:
        return f"no {precision} variant in the manifest; build it first"
    if precision == "int8" and "fp32" not in manifest.variants:
        return "int8 for TensorRT is re-quantized from the fp32 variant, which is missing"
    record = manifest.variants[precision]
    if not record.file.endswith(".onnx"):
        return f"variant file {record.file} is not ONNX"
    return None


def _build_plan(
    onnx_path: Path,
    version_dir: Path,
    record_gpu: dict[str, Any],
    gpu: GpuInfo,
    ccs: list[str],
    engine_options: EngineBuildOptions,
    force: bool,
) -> tuple[str, dict[str, Any]]:
    """Build (or reuse) the plan for this GPU; return status and the engine's metadata."""
    from builder.gpu.tensorrt_build import build_engine, import_tensorrt

    trt = import_tensorrt()
    plan = version_dir / (plan_filename(gpu.compute_capability) if len(ccs) > 1 else "model.plan")
    previous = record_gpu.get("engines", {}).get(gpu.compute_capability)
    if (
        not force
        and previous
        and plan.is_file()
        and previous.get("plan") == plan.name
        and previous.get("onnx_sha256") == file_sha256(onnx_path)
        and previous.get("tensorrt_version") == str(trt.__version__)
    ):
        return "reused", previous
    return "built", build_engine(onnx_path, plan, engine_options, gpu)


def _rename_single_plans(version_dir: Path, entry: dict[str, Any], ccs: list[str]) -> None:
    """Once several architectures are targeted, a plan built alone as ``model.plan`` on another
    host is renamed to its per-architecture name so ``cc_model_filenames`` finds it."""
    if len(ccs) < 2:
        return
    for cc, meta in entry.get("engines", {}).items():
        want = plan_filename(cc)
        old = version_dir / meta.get("plan", "")
        if meta.get("plan") != want and old.is_file():
            os.replace(old, version_dir / want)
            meta["plan"] = want


def build_gpu_target(
    manifest: Manifest,
    repository: Path,
    configs_only: bool = False,
    *,
    calibration: Dataset | None = None,
    options: GpuTargetOptions | None = None,
) -> GpuTargetResult:
    """Write the GPU models for ``manifest``'s variants; build engines unless ``configs_only``.

    Without CUDA or TensorRT (and not ``configs_only``) this raises
    :class:`GpuUnavailableError` whose message is the one line to print. ``calibration`` is
    needed only when the INT8 variant must be re-quantized symmetrically for TensorRT.
    """
    options = options or GpuTargetOptions()
    repository = Path(repository)
    gpu: GpuInfo | None = None
    if not configs_only:
        problem = check_gpu_available()
        if problem:
            raise GpuUnavailableError(problem)
        from builder.gpu.device import gpu_info
        from builder.gpu.tensorrt_build import import_tensorrt

        import_tensorrt()
        gpu = gpu_info()

    server_root = options.server_repository or str(repository.resolve())
    ort_cache_root = f"{server_root.rstrip('/')}/{TIMING_CACHE_DIR.as_posix()}/ort"
    wanted = options.precisions or [p for p in manifest.variants if p in GPU_PRECISIONS]
    results: list[GpuVariantResult] = []
    for precision in wanted:
        trt_name = f"{manifest.model}_{precision}_trt"
        ort_name = f"{manifest.model}_{precision}_ort_trt"
        reason = _skip_reason(manifest, precision)
        if reason:
            results.extend(
                GpuVariantResult(precision, b, n, "skipped", reason)
                for b, n in (("tensorrt_plan", trt_name), ("onnxruntime", ort_name))
                if b in options.backends
            )
            continue
        record = manifest.variants[precision]
        serving = _serving(manifest, repository, record)
        profile = _manifest_profile(manifest, serving, options)
        gpu_details: dict[str, Any] = dict(record.details.get("gpu", {}))

        # The ONNX file both GPU backends consume, written once, linked into the second.
        first = trt_name if "tensorrt_plan" in options.backends else ort_name
        onnx_path = repository / first / "1" / ONNX_NAME
        source = _onnx_for(precision, manifest, repository, onnx_path, calibration, options)
        gpu_details["onnx"] = {**source, "sha256": file_sha256(onnx_path)}

        if "tensorrt_plan" in options.backends:
            trt_entry: dict[str, Any] = dict(gpu_details.get("tensorrt_plan", {}))
            ccs = sorted(set(options.compute_capabilities) | set(trt_entry.get("targets", [])))
            status, why = "configs-only", "no engine built (--configs-only)"
            if gpu is not None:
                ccs = sorted(set(ccs) | {gpu.compute_capability})
                cache = timing_cache_path(repository, gpu)
                status, meta = _build_plan(
                    onnx_path,
                    repository / trt_name / "1",
                    trt_entry,
                    gpu,
                    ccs,
                    _engine_options(serving, options, cache),
                    options.force,
                )
                why = f"{meta['plan']}, TensorRT {meta['tensorrt_version']}"
                engines = dict(trt_entry.get("engines", {}))
                engines[gpu.compute_capability] = {
                    **meta,
                    "timing_cache": {
                        **meta.get("timing_cache", {}),
                        "path": os.path.relpath(cache, repository),
                    },
                }
                trt_entry["engines"] = engines
            _rename_single_plans(repository / trt_name / "1", trt_entry, ccs)
            cfg = tensorrt_plan_config(
                trt_name, manifest.inputs, manifest.outputs, serving, ccs, profile
            )
            write_config(repository / trt_name, cfg)
            trt_entry.update(
                triton_name=trt_name,
                onnx=f"{trt_name}/1/{ONNX_NAME}",
                targets=ccs,
                plan_files=plan_filenames(ccs) or {"default": "model.plan"},
            )
            gpu_details["tensorrt_plan"] = trt_entry
            results.append(GpuVariantResult(precision, "tensorrt_plan", trt_name, status, why))

        if "onnxruntime" in options.backends:
            ort_onnx = repository / ort_name / "1" / ONNX_NAME
            _link_or_copy(onnx_path, ort_onnx)
            engine_cache = f"{ort_cache_root}/{ort_name}"
            cfg = onnxruntime_tensorrt_config(
                ort_name,
                manifest.inputs,
                manifest.outputs,
                serving,
                precision,
                engine_cache_path=engine_cache,
                timing_cache_path=ort_cache_root,
                profile=profile,
                workspace_bytes=options.workspace_bytes,
            )
            write_config(repository / ort_name, cfg)
            gpu_details["onnxruntime_tensorrt"] = {
                "triton_name": ort_name,
                "onnx": f"{ort_name}/1/{ONNX_NAME}",
                "precision_mode": PRECISION_MODES[precision],
                "engine_cache_path": engine_cache,
            }
            results.append(
                GpuVariantResult(
                    precision, "onnxruntime", ort_name, "config", "Triton's ORT builds the engine"
                )
            )
        record.details["gpu"] = gpu_details

    manifest.save(repository)
    return GpuTargetResult(manifest, results, gpu)


def default_precisions(manifest: Manifest) -> Sequence[str]:
    """The precisions ``--target gpu`` handles for this manifest when none are named."""
    return [p for p in manifest.variants if p in GPU_PRECISIONS]
