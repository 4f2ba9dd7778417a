"""The build engine: one model source in, a Triton repository of checked variants out."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from builder import hostinfo
from builder.cache import calibration_cache_dir
from builder.calibration import METHODS, load_calibration_data
from builder.engine_choice import choose_engine, measure_round_robin
from builder.errors import BuildError
from builder.evaluate import EVAL_BATCH, Evaluator
from builder.manifest import Manifest, VariantRecord, load_manifest, manifest_path
from builder.precisions import BuildContext, VariantResult, get_precision
from builder.prepare import optimize_basic
from builder.repository import (
    ensure_writable,
    install,
    remove_tree,
    staging_dir,
    variant_layout,
)
from builder.sources import LoadedModel, load_model
from builder.triton_backend import standard_backend
from builder.triton_config import ServingOptions, build_model_config, write_config
from server.engines import EngineError, engine_names, get_engine

log = logging.getLogger(__name__)

TARGETS = ("cpu", "gpu")


@dataclass
class BuildOptions:
    """Everything a build can be told; the CLI only fills this in."""

    repository: Path = Path("model_repository")
    precisions: list[str] | None = None  # None: the source's defaults
    calibration_method: str = "minmax"
    calibration_data: Path | None = None
    calibration_samples: int = 256
    accuracy_budget: float | None = None  # points of accuracy (see builder.evaluate)
    force: bool = False
    measure_speed: bool = True
    threads: int = 0  # engine threads for evaluation/timing; 0 = engine default
    instance_count: int = 1
    # 0: batch what queued while the engine was busy, never wait for more. On CPUs batching
    # gains little per row for big models, and at low load any wait is pure latency (the
    # gateway benchmark measured 0.67 ms of its p50 waiting at 500 us). Raise it for GPUs.
    max_queue_delay_us: int = 0
    engine: str | None = None  # force one engine for every variant
    target: str = "cpu"
    configs_only: bool = False
    progress: bool = True
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.repository = Path(self.repository)
        if self.calibration_method not in METHODS:
            raise BuildError(
                f"calibration_method must be one of {', '.join(METHODS)}, "
                f"got {self.calibration_method!r}"
            )
        if self.calibration_samples < 1:
            raise BuildError(f"calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.accuracy_budget is not None and self.accuracy_budget < 0:
            raise BuildError(f"accuracy_budget must be >= 0, got {self.accuracy_budget}")
        if self.engine is not None and self.engine not in engine_names():
            raise BuildError(f"unknown engine {self.engine!r}; known: {', '.join(engine_names())}")
        if self.target not in TARGETS:
            raise BuildError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.calibration_data is not None:
            self.calibration_data = Path(self.calibration_data)


def triton_name(model: str, precision: str) -> str:
    return f"{model}_{precision}"


def speed_batch(model: LoadedModel) -> int:
    want = 16 if model.transformer else 8
    return min(want, model.max_batch_size) if model.max_batch_size > 0 else 1


def _serving(model: LoadedModel, options: BuildOptions) -> ServingOptions:
    mbs = model.max_batch_size
    return ServingOptions(
        max_batch_size=mbs,
        preferred_batch_sizes=[b for b in (4, 8, 16) if b <= mbs],
        max_queue_delay_us=options.max_queue_delay_us,
        instance_count=options.instance_count,
    )


def _existing(manifest: Manifest | None, repo: Path, precision: str) -> VariantRecord | None:
    if manifest is None or precision not in manifest.variants:
        return None
    record = manifest.variants[precision]
    return record if (repo / record.file).is_file() else None


def build_model(spec: str, options: BuildOptions) -> Manifest:
    """Build (or refresh) every requested precision variant of ``spec`` into the repository."""
    if options.target == "gpu" and not options.configs_only:
        from builder.gpu.device import check_gpu_available
        from builder.gpu.errors import GpuUnavailableError

        problem = check_gpu_available()
        if problem:  # fail before any CPU work
            raise GpuUnavailableError(problem)
    repo = ensure_writable(options.repository)
    work = staging_dir(repo, "build")
    try:
        return _build(spec, options, repo, work)
    except EngineError as e:
        raise BuildError(str(e)) from e
    finally:
        remove_tree(work)


def _build(spec: str, options: BuildOptions, repo: Path, work: Path) -> Manifest:
    model = load_model(spec, work / "source")
    if options.calibration_data is not None:
        model.calibration = load_calibration_data(options.calibration_data, model.inputs)
    precisions = options.precisions or list(model.default_precisions)
    plugins = {p: get_precision(p) for p in precisions}  # unknown names fail before any work

    old = None
    if manifest_path(repo, model.name).exists():
        old = load_manifest(manifest_path(repo, model.name))
    manifest = Manifest(
        model=model.name,
        source=model.source,
        task=model.task,
        inputs=model.inputs,
        outputs=model.outputs,
        max_batch_size=model.max_batch_size,
        accuracy_meaningful=model.accuracy_meaningful,
        notes=list(model.notes),
        host=dict(hostinfo.cpu_info()),
        variants=dict(old.variants) if old else {},
    )

    kept_fp32 = None if options.force else _existing(old, repo, "fp32")
    if kept_fp32:
        reference = repo / kept_fp32.file
    else:
        reference = optimize_basic(model.fp32_onnx, work / "fp32_optimized.onnx")
    eval_batch = min(EVAL_BATCH, model.max_batch_size) if model.max_batch_size > 0 else 1
    evaluator = Evaluator(model.task, model.evaluation, reference, options.threads, eval_batch)
    cache_dir = calibration_cache_dir(model.name)
    serving = _serving(model, options)

    bar = tqdm(precisions, desc=f"{model.name}: variants", disable=not options.progress)
    for precision in bar:
        bar.set_postfix_str(precision)
        name = triton_name(model.name, precision)
        if not options.force and _existing(old, repo, precision):
            log.info("%s exists; kept (use --force to rebuild)", name)
            continue
        reason = plugins[precision].skip_reason(model, options)
        if reason:
            manifest.notes.append(f"{precision} skipped: {reason}")
            manifest.variants.pop(precision, None)
            continue
        manifest.variants[precision] = _build_variant(
            model,
            precision,
            plugins[precision],
            options,
            repo,
            work,
            reference,
            evaluator,
            cache_dir,
            serving,
        )

    if options.measure_speed and manifest.variants:
        _measure(manifest, model, repo, options)
    write_samples(repo, model)
    manifest.save(repo)
    if options.target == "gpu":
        _build_gpu(manifest, model, repo, options)
    return manifest


def _build_gpu(manifest: Manifest, model: LoadedModel, repo: Path, options: BuildOptions) -> None:
    """TensorRT plans and GPU Triton configs next to the CPU variants (see docs/gpu.md)."""
    from builder.gpu.target import GpuTargetOptions, build_gpu_target

    result = build_gpu_target(
        manifest,
        repo,
        options.configs_only,
        calibration=model.calibration.take(options.calibration_samples),
        options=GpuTargetOptions(
            calibration_method=options.calibration_method, force=options.force
        ),
    )
    manifest.notes = [n for n in manifest.notes if not n.startswith("gpu target: ")]
    manifest.notes.extend(f"gpu target: {line}" for line in result.summary_lines())
    manifest.save(repo)


SAMPLES_SUFFIX = ".samples.npz"
SAMPLE_ROWS = 64


def samples_path(repository: Path, model: str) -> Path:
    return Path(repository) / f"{model}{SAMPLES_SUFFIX}"


def write_samples(repo: Path, model: LoadedModel) -> Path:
    """Real evaluation rows (and labels, under ``__labels__``) for clients that have no torch:
    the load test and the benchmarks send these."""
    import io

    import numpy as np

    rows = model.evaluation.take(SAMPLE_ROWS)
    arrays = dict(rows.inputs)
    if rows.labels is not None:
        arrays["__labels__"] = rows.labels
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    target = samples_path(repo, model.name)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(target)
    return target


def _build_variant(
    model: LoadedModel,
    precision: str,
    plugin: object,
    options: BuildOptions,
    repo: Path,
    work: Path,
    reference: Path,
    evaluator: Evaluator,
    cache_dir: Path,
    serving: ServingOptions,
) -> VariantRecord:
    name = triton_name(model.name, precision)
    started = time.perf_counter()
    staged = work / name
    out_file = variant_layout(staged)
    ctx = BuildContext(
        model=model,
        fp32_path=reference,
        options=options,
        cache_dir=cache_dir,
        evaluator=evaluator,
        work_dir=work / f"{precision}-scratch",
    )
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    result: VariantResult = plugin.build(ctx, out_file)  # type: ignore[attr-defined]
    # The engine that runs the file: measured here, quality-checked; --engine overrides.
    choice = choose_engine(
        result,
        out_file,
        evaluator,
        model.evaluation,
        speed_batch(model),
        forced=options.engine,
        measure=options.measure_speed,
        threads=options.threads,
    )
    result.engine, result.engine_options = choice.engine, choice.options
    quality = choice.quality
    platform = triton_platform(result, serving.max_batch_size)
    cfg = build_model_config(name, model.inputs, model.outputs, serving, **platform)
    write_config(staged, cfg)
    install(staged, repo / name, work / "replaced")
    details = dict(result.details)
    details.update(choice.details())
    details["accuracy_loss"] = quality.pop("accuracy_loss")
    return VariantRecord(
        precision=precision,
        triton_name=name,
        file=f"{name}/1/{out_file.name}",
        engine=result.engine,
        engine_options=result.engine_options,
        size_bytes=(repo / name / "1" / out_file.name).stat().st_size,
        quality=quality,
        details=details,
        build_seconds=round(time.perf_counter() - started, 2),
    )


def triton_platform(result: VariantResult, max_batch_size: int = 1) -> dict[str, Any]:
    """How a standard Triton container serves this variant's file (builder.triton_backend)."""
    return standard_backend(result.engine, result.engine_options, result.path.name, max_batch_size)


def _measure(manifest: Manifest, model: LoadedModel, repo: Path, options: BuildOptions) -> None:
    sessions = {
        p: get_engine(v.engine).load(repo / v.file, v.engine_options, options.threads)
        for p, v in manifest.variants.items()
    }
    speeds = measure_round_robin(sessions, model.evaluation, speed_batch(model), inner_rounds=1)
    fp32 = speeds.get("fp32")
    for p, s in speeds.items():
        if fp32:
            s["speedup_vs_fp32"] = s["throughput"] / fp32["throughput"]
        manifest.variants[p].speed = {k: round(v, 3) for k, v in s.items()}
