"""The build engine: one model source in, a Triton repository of checked variants out."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from builder import hostinfo
from builder.budget import SpeedFn
from builder.cache import calibration_cache_dir
from builder.calibration import load_calibration_data, load_eval_data
from builder.engine_choice import choose_engine, measure_round_robin
from builder.errors import BudgetNotMet, BuildError
from builder.evaluate import EVAL_BATCH, Evaluator, quality_source
from builder.max_shapes import apply_max_shapes
from builder.options import BuildOptions
from builder.precisions import BuildContext, RefusesModels, VariantResult, get_precision
from builder.prepare import optimize_basic
from builder.sources import LoadedModel, load_model, preview_model
from builder.sources.base import Dataset, LlmSource
from builder.sources.common import with_data_note
from builder.staging import (
    ensure_writable,
    install,
    remove_tree,
    staging_dir,
    variant_layout,
)
from builder.triton_backend import standard_backend
from common.engines import EngineError, get_engine
from common.model_repository import (
    SAMPLES_LABELS_KEY,
    Manifest,
    ServingOptions,
    VariantRecord,
    atomic_write_bytes,
    build_model_config,
    load_manifest,
    manifest_path,
    samples_path,
    variant_name,
    write_config,
)

log = logging.getLogger(__name__)


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
    from builder.sources import llm_source

    llm = llm_source(spec)
    if llm is not None:  # a decoder LLM (the source declares it): builder/llm
        return _build_llm(spec, llm, options)
    repo = ensure_writable(options.repository)
    work = staging_dir(repo, "build")
    try:
        return _build(spec, options, repo, work)
    except EngineError as e:
        raise BuildError(str(e)) from e
    finally:
        remove_tree(work)


def _build_llm(spec: str, found: tuple[LlmSource, str], options: BuildOptions) -> Manifest:
    from builder.llm.pipeline import build_llm, check_precisions

    if options.target != "cpu":
        raise BuildError(
            "decoder LLMs build for CPU here; their GPU precisions (fp16/bf16) need "
            "onnxruntime-genai's CUDA build (docs/llm.md)"
        )
    check_precisions(options.precisions)  # before the source's work
    source, reference = found
    model = source.load_llm(reference, ensure_writable(options.repository))
    model.source = spec
    return build_llm(model, options)


def _check_refusals(plugins: dict[str, object], model: LoadedModel, options: BuildOptions) -> None:
    """A requested precision that refuses this model fails the build now, naming why."""
    for plugin in plugins.values():
        if isinstance(plugin, RefusesModels):
            reason = plugin.refusal(model, options)
            if reason:
                raise BuildError(reason)


def _refuse_before_loading(spec: str, options: BuildOptions, work: Path) -> None:
    """Requested precisions that may refuse the model look at its preview, where its source
    has one, before the source's work (the digits demo trains a CNN for a minute)."""
    if not options.precisions:
        return
    plugins = {p: get_precision(p) for p in options.precisions}
    if any(isinstance(p, RefusesModels) for p in plugins.values()):
        preview = preview_model(spec, work / "preview")
        if preview is not None:
            _check_refusals(plugins, preview, options)


def _load(spec: str, options: BuildOptions, work: Path) -> LoadedModel:
    model = load_model(spec, work / "source")
    if options.max_shapes:
        model.inputs = apply_max_shapes(model.inputs, options.max_shapes)
    if options.calibration_data is not None:
        model.calibration = load_calibration_data(options.calibration_data, model.inputs)
    if options.eval_data is not None:  # calibration keeps the calibration rows
        model.evaluation = load_eval_data(options.eval_data, model.inputs)
    if options.calibration_data is not None or options.eval_data is not None:
        model.notes = with_data_note(model.notes, model.calibration, model.evaluation)
    return model


def _build(spec: str, options: BuildOptions, repo: Path, work: Path) -> Manifest:
    _refuse_before_loading(spec, options, work)
    model = _load(spec, options, work)
    precisions = options.precisions or list(model.default_precisions)
    plugins = {p: get_precision(p) for p in precisions}  # unknown names fail before any work
    _check_refusals(plugins, model, options)

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
    speedup = _lazy_speedup(reference, model, options)

    def build_one(precision: str) -> None:
        name = variant_name(model.name, precision)
        if not options.force and _existing(old, repo, precision):
            log.info("%s exists; kept (use --force to rebuild)", name)
            if options.eval_data is not None:
                log.warning("%s kept: its quality figures are not from --eval-data (--force)", name)
            return
        reason = plugins[precision].skip_reason(model, options)
        if reason:
            manifest.notes.append(f"{precision} skipped: {reason}")
            manifest.variants.pop(precision, None)
            return
        try:
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
                speedup,
            )
        except BudgetNotMet as e:
            log.warning("%s", e)
            manifest.notes.append(str(e))
            manifest.variants.pop(precision, None)
            remove_tree(repo / name)  # an earlier build's copy must not be served either

    bar = tqdm(precisions, desc=f"{model.name}: variants", disable=not options.progress)
    for precision in bar:
        bar.set_postfix_str(precision)
        build_one(precision)
    why = qat_wanted(model, options, precisions, manifest)
    if why:
        log.info("int8-qat: %s", why)
        manifest.notes.append(f"int8-qat added: {why}")
        plugins[QAT] = get_precision(QAT)
        build_one(QAT)

    loads = []
    if options.measure_speed and manifest.variants:
        loads.append(_measure(manifest, model, repo, options))
    note_busy_host(manifest, loads)
    write_samples(repo, model)
    manifest.save(repo)
    if options.target == "gpu":
        _build_gpu(manifest, model, repo, options)
    return manifest


QAT = "int8-qat"
POST_TRAINING_INT8 = ("int8", "int8-dynamic")


def qat_wanted(
    model: LoadedModel, options: BuildOptions, precisions: list[str], manifest: Manifest
) -> str | None:
    """Why int8-qat is added to a build that did not ask for it (None: it is not).

    ``--qat always``: whenever the source can be trained. ``--qat auto`` (the default): with
    ``--accuracy-budget``, when the post-training INT8 precisions built here all missed the
    budget fully quantized (missed it, or met it only by keeping layers FP32)."""
    from builder.precisions.qat_options import QatOptions

    qat = QatOptions.from_extra(options.extra)
    if QAT in precisions or model.trainable is None or qat.when == "never":
        return None
    if qat.when == "always":
        return "--qat always"
    if options.accuracy_budget is None:
        return None
    tried = [p for p in precisions if p in POST_TRAINING_INT8]
    if not tried:
        return None
    for p in tried:
        v = manifest.variants.get(p)
        if v is not None and v.details.get("budget_met") and not v.details.get("fp32_kept_nodes"):
            return None
    return (
        f"post-training INT8 ({', '.join(tried)}) did not meet --accuracy-budget "
        f"{options.accuracy_budget:g} fully quantized"
    )


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


SAMPLE_ROWS = 64


def write_samples(repo: Path, model: LoadedModel) -> Path:
    """Real evaluation rows (and labels, under ``__labels__``) for clients that have no torch:
    the load test and the benchmarks send these."""
    import io

    import numpy as np

    rows = model.evaluation.take(SAMPLE_ROWS)
    arrays = dict(rows.inputs)
    if rows.labels is not None:
        arrays[SAMPLES_LABELS_KEY] = rows.labels
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    target = samples_path(repo, model.name)
    atomic_write_bytes(target, buf.getvalue())
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
    speedup: SpeedFn | None = None,
) -> VariantRecord:
    name = variant_name(model.name, precision)
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
        speedup=speedup,
    )
    ctx.work_dir.mkdir(parents=True, exist_ok=True)
    result: VariantResult = plugin.build(ctx, out_file)  # type: ignore[attr-defined]
    if result.details.get("budget_met") is False:
        status = result.details.get("budget_status", "budget not met")
        if not options.keep_over_budget:
            raise BudgetNotMet(f"{precision} not written: {status} (--keep-over-budget keeps it)")
        result.details["budget_status"] = f"{status}; kept by --keep-over-budget"
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
        quality_source=quality_source(model.task, model.evaluation),
        details=details,
        build_seconds=round(time.perf_counter() - started, 2),
    )


def measured_speedup(
    fp32_path: Path,
    sample: Dataset,
    batch_size: int,
    threads: int = 0,
    engine: str = "onnxruntime",
) -> SpeedFn:
    """A brief interleaved timing of a candidate file against the FP32 file (throughput at
    ``batch_size``; ``engine_choice.measure_round_robin`` with few rounds)."""
    loader = get_engine(engine)
    reference = loader.load(fp32_path, {}, threads)

    def timed(path: Path) -> float:
        candidate = loader.load(path, {}, threads)
        speeds = measure_round_robin(
            {"fp32": reference, "candidate": candidate},
            sample,
            batch_size,
            rounds=3,
            inner_rounds=2,
            latency_runs=2,
        )
        return speeds["candidate"]["throughput"] / speeds["fp32"]["throughput"]

    return timed


def _lazy_speedup(reference: Path, model: LoadedModel, options: BuildOptions) -> SpeedFn | None:
    """The budget search's timer: a candidate vs the FP32 reference on this host, at the
    model's speed batch (the FP32 session is loaded on first use)."""
    if not options.measure_speed or options.accuracy_budget is None:
        return None
    timer: list[SpeedFn] = []

    def speedup(path: Path) -> float | None:
        if not timer:
            timer.append(
                measured_speedup(reference, model.evaluation, speed_batch(model), options.threads)
            )
        return timer[0](path)

    return speedup


def triton_platform(result: VariantResult, max_batch_size: int = 1) -> dict[str, Any]:
    """How a standard Triton container serves this variant's file (builder.triton_backend)."""
    return standard_backend(result.engine, result.engine_options, result.path.name, max_batch_size)


BUSY_NOTE = "busy host: "


def note_busy_host(manifest: Manifest, loads: list[float]) -> None:
    """Record the highest load average seen while this build timed engines and variants in the
    manifest's ``host`` (``load_average``, ``busy``), and a note when it was over the core
    count: the engine choices and speeds were measured on a shared CPU (the gateway re-checks
    them at start-up, server/routing/retime.py)."""
    loads = [*loads] + [
        float(v.details["engine_decision"]["load_average"])
        for v in manifest.variants.values()
        if "load_average" in v.details.get("engine_decision", {})
    ]
    manifest.notes = [n for n in manifest.notes if not n.startswith(BUSY_NOTE)]
    if not loads:
        return
    load, cores = max(loads), int(manifest.host.get("cores") or 1)
    manifest.host["load_average"] = load
    manifest.host["busy"] = hostinfo.busy(load, cores)
    if manifest.host["busy"]:
        kept = [p for p, v in manifest.variants.items() if _within_noise(v)]
        manifest.notes.append(
            f"{BUSY_NOTE}load average up to {load:.2f} over {cores} cores while engines and "
            "variants were timed: the speeds are noisy"
            + (f"; engine kept within noise for {', '.join(kept)}" if kept else "")
            + "; the gateway re-checks the engines at start-up (--retime auto)"
        )


def _within_noise(record: VariantRecord) -> bool:
    return record.details.get("engine_decision", {}).get("verdict") == "within noise"


def _measure(manifest: Manifest, model: LoadedModel, repo: Path, options: BuildOptions) -> float:
    """Every variant's speed on its engine, round-robin; returns the highest load average seen."""
    sessions = {
        p: get_engine(v.engine).load(repo / v.file, v.engine_options, options.threads)
        for p, v in manifest.variants.items()
    }
    load = hostinfo.load_average()
    speeds = measure_round_robin(sessions, model.evaluation, speed_batch(model), inner_rounds=1)
    load = max(load, hostinfo.load_average())
    fp32 = speeds.get("fp32")
    for p, s in speeds.items():
        if fp32:
            s["speedup_vs_fp32"] = s["throughput"] / fp32["throughput"]
        manifest.variants[p].speed = {k: round(v, 3) for k, v in s.items()}
    return load
