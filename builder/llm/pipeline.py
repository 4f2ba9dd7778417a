"""The decoder-LLM build: a Hugging Face causal-LM folder in, decoupled python-backend Triton
models (one per precision) and the manifest out (docs/llm.md).

For each precision onnxruntime-genai builds the genai folder (cached by a hash of its inputs,
builder/llm/genai_build.py); each variant's quality is measured against the fp32 build on the
evaluation text (builder/llm/quality.py; fp32 is built as the reference even when it is not
asked for), then the new variants' speed on this host (builder/llm/speed.py). With
``--accuracy-budget`` (perplexity increase over fp32, percent) and/or ``--kl-budget`` (mean KL
in nats) a variant over budget is not written unless ``--keep-over-budget``; the fastest variant
within budget is named in the manifest's notes.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from builder import hostinfo
from builder.llm import genai_build, layout, quality, speed
from builder.llm.precisions import check_precision, options_from_extra, recipe
from builder.options import BuildOptions
from builder.sources.base import LlmModel
from builder.staging import ensure_writable, install, remove_tree, staging_dir
from common.llm import GenaiModel
from common.model_repository import (
    LLM_TASK,
    UNLABELLED,
    LlmModelRecord,
    LlmSpeed,
    LlmVariantRecord,
    Manifest,
    VariantRecord,
    load_manifest,
    manifest_path,
    variant_name,
    write_config,
)

log = logging.getLogger(__name__)

REFERENCE = "fp32"
BUDGET_NOTE = "budget: "


def check_precisions(precisions: list[str] | None) -> None:
    """Refuse, before any work, a precision an LLM cannot have here (one line)."""
    for p in precisions or []:
        check_precision(p)


def speed_threads(options: BuildOptions) -> list[int]:
    """1 thread and the threads the builder uses elsewhere (``--threads``, 0: every core)."""
    return sorted({1, options.threads or int(hostinfo.cpu_info()["cores"])})


@dataclass
class _Built:
    precision: str
    genai: Path  # the cache entry
    cache_hit: bool
    seconds: float
    record: VariantRecord | None = None


def build_llm(model: LlmModel, options: BuildOptions) -> Manifest:
    precisions = options.precisions or list(model.default_precisions)
    check_precisions(precisions)
    repo = ensure_writable(options.repository)
    work = staging_dir(repo, "build")
    try:
        return _build(model, options, precisions, repo, work)
    finally:
        remove_tree(work)


def _old_variants(repo: Path, name: str) -> dict[str, VariantRecord]:
    path = manifest_path(repo, name)
    if not path.exists():
        return {}
    old = load_manifest(path)
    if old.task != LLM_TASK:
        return {}
    return {p: v for p, v in old.variants.items() if (repo / v.file).is_dir()}


def _build(
    model: LlmModel, options: BuildOptions, precisions: list[str], repo: Path, work: Path
) -> Manifest:
    text = quality.eval_text(options.eval_data)
    old = _old_variants(repo, model.name)
    todo = [p for p in precisions if options.force or p not in old]
    inputs, outputs = layout.tensor_specs()
    notes = list(model.notes)
    if model.reference_note:
        notes.append(model.reference_note)
    manifest = Manifest(
        model=model.name,
        source=model.source,
        task=LLM_TASK,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=0,
        notes=notes,
        host=dict(hostinfo.cpu_info()),
        variants={p: v for p, v in old.items() if p not in todo},
    )
    for p in precisions:
        if p not in todo:
            log.info("%s exists; kept (use --force to rebuild)", variant_name(model.name, p))
    llm_options = options_from_extra(options.extra)
    digest = genai_build.folder_digest(model.hf_folder)
    built: dict[str, _Built] = {}
    needed = ([REFERENCE] if todo and REFERENCE not in todo else []) + todo
    bar = tqdm(needed, desc=f"{model.name}: genai builds", disable=not options.progress)
    for p in bar:
        bar.set_postfix_str(p)
        started = time.perf_counter()
        genai, hit = genai_build.cached_build(model.hf_folder, digest, recipe(p, llm_options))
        built[p] = _Built(p, genai, hit, round(time.perf_counter() - started, 2))

    context = 0
    window = 0
    if todo:
        reference_model = GenaiModel(built[REFERENCE].genai, options.threads or None)
        context = reference_model.context_length
        windows = quality.token_windows(reference_model, text.text)
        window = len(windows[0])
        reference = quality.log_probs(reference_model, windows)
        del reference_model
        for p in tqdm(todo, desc=f"{model.name}: quality", disable=not options.progress):
            q = _quality(built[p].genai, options, windows, reference)
            built[p].record = _record(model.name, p, built[p], q, recipe(p, llm_options))
        del reference
        gc.collect()
    if todo and options.measure_speed:
        _measure(model, built, todo, text.text, options)
    for p in todo:
        _budget(built[p].record, options)  # type: ignore[arg-type]

    previous = manifest_path(repo, model.name)
    if previous.exists() and not old:  # an earlier, non-LLM manifest of the same name
        log.warning("%s replaced by the LLM build", previous)
    for p in todo:
        record = built[p].record
        assert record is not None
        if record.details.get("budget_met") is False and not options.keep_over_budget:
            manifest.notes.append(
                f"{p} not written: {record.details['budget_status']} (--keep-over-budget keeps it)"
            )
            manifest.variants.pop(p, None)
            remove_tree(repo / record.triton_name)
            continue
        _install(record, built[p].genai, options, repo, work)
        manifest.variants[p] = record
    manifest.variants = {p: manifest.variants[p] for p in precisions if p in manifest.variants}
    old_llm = load_manifest(previous).llm if old and previous.exists() else None
    manifest.llm = LlmModelRecord(
        architecture=model.architecture,
        context_length=context or (old_llm.context_length if old_llm else 0),
        eval_text=text.description,
        eval_window=window or (old_llm.eval_window if old_llm else 0),
        prompt_tokens=speed.PROMPT_TOKENS,
        output_tokens=speed.OUTPUT_TOKENS,
        reference_note=model.reference_note,
    )
    _speedups(manifest, options)
    loads = [
        float(v.details["load_average"])
        for v in manifest.variants.values()
        if "load_average" in v.details
    ]
    if loads:
        cores = int(manifest.host.get("cores") or 1)
        manifest.host["load_average"] = max(loads)
        manifest.host["busy"] = hostinfo.busy(max(loads), cores)
    _choose_within_budget(manifest, options)
    manifest.save(repo)
    return manifest


def _quality(
    genai: Path, options: BuildOptions, windows: list[list[int]], reference: list
) -> quality.Quality:
    candidate_model = GenaiModel(genai, options.threads or None)
    candidate = quality.log_probs(candidate_model, windows)
    return quality.compare(reference, candidate, windows)


def _record(
    name: str, precision: str, built: _Built, q: quality.Quality, r: genai_build.GenaiRecipe
) -> VariantRecord:
    triton_name = variant_name(name, precision)
    return VariantRecord(
        precision=precision,
        triton_name=triton_name,
        file=f"{triton_name}/{layout.genai_dir(Path('.')).as_posix()}",
        engine="onnxruntime-genai",
        size_bytes=genai_build.folder_bytes(built.genai),
        quality={
            "ppl": q.ppl,
            "ppl_ratio": q.ppl_ratio,
            "kl_mean": q.kl_mean,
            "top1_agreement": q.top1_agreement,
        },
        quality_source=UNLABELLED,
        details={
            "accuracy_loss": round(q.accuracy_loss(), 4),
            "genai_cache_hit": built.cache_hit,
        },
        build_seconds=built.seconds,
        llm=LlmVariantRecord(
            ppl=round(q.ppl, 4),
            ppl_ratio=round(q.ppl_ratio, 5),
            kl_mean=round(q.kl_mean, 6),
            top1_agreement=round(q.top1_agreement, 5),
            eval_tokens=q.eval_tokens,
            genai_precision=r.precision,
            genai_options=dict(r.options),
        ),
    )


def _measure(
    model: LlmModel, built: dict[str, _Built], todo: list[str], text: str, options: BuildOptions
) -> None:
    for threads in speed_threads(options):
        models = {p: GenaiModel(built[p].genai, threads) for p in todo}
        prompts = {p: speed.prompt_tokens(m, text, speed.PROMPT_TOKENS) for p, m in models.items()}
        load = hostinfo.load_average()
        figures = speed.measure(models, prompts, threads)
        load = max(load, hostinfo.load_average())
        for p, s in figures.items():
            record = built[p].record
            assert record is not None and record.llm is not None
            record.llm.speed.append(s)
            record.details["load_average"] = max(load, record.details.get("load_average", 0.0))
        del models
        gc.collect()


def _primary(record: VariantRecord, options: BuildOptions) -> LlmSpeed | None:
    if record.llm is None or not record.llm.speed:
        return None
    wanted = max(speed_threads(options))
    return record.llm.speed_at(wanted) or record.llm.speed[-1]


def _speedups(manifest: Manifest, options: BuildOptions) -> None:
    """``speed`` (what the routing policies read): decode tokens/s as throughput, TTFT and ITL
    at the builder's threads, and tokens/s relative to fp32."""
    fp32 = manifest.variants.get(REFERENCE)
    base = _primary(fp32, options) if fp32 else None
    for record in manifest.variants.values():
        s = _primary(record, options)
        if s is None:
            continue
        record.speed = {
            "throughput": s.decode_tok_s,
            "decode_tok_s": s.decode_tok_s,
            "ttft_ms": s.ttft_ms,
            "itl_ms": s.itl_ms,
            "threads": float(s.threads),
        }
        if base is not None:
            record.speed["speedup_vs_fp32"] = round(s.decode_tok_s / base.decode_tok_s, 3)


def _budget(record: VariantRecord, options: BuildOptions) -> None:
    """Record whether the variant meets ``--accuracy-budget`` / ``--kl-budget``."""
    ppl_budget, kl_budget = options.accuracy_budget, options.kl_budget
    if ppl_budget is None and kl_budget is None:
        return
    assert record.llm is not None
    loss = float(record.details["accuracy_loss"])
    misses = []
    if ppl_budget is not None and loss > ppl_budget:
        misses.append(f"perplexity +{loss:.2f} % over the {ppl_budget:g} % budget")
    if kl_budget is not None and record.llm.kl_mean > kl_budget:
        misses.append(f"KL {record.llm.kl_mean:.4f} over the {kl_budget:g} budget")
    limits = ", ".join(
        x
        for x in (
            f"perplexity +{ppl_budget:g} %" if ppl_budget is not None else "",
            f"KL {kl_budget:g}" if kl_budget is not None else "",
        )
        if x
    )
    record.details["accuracy_budget"] = ppl_budget
    record.details["kl_budget"] = kl_budget
    record.details["budget_met"] = not misses
    record.details["budget_status"] = (
        f"budget not met: {'; '.join(misses)}" if misses else f"budget ({limits}) met"
    )
    if misses and options.keep_over_budget:
        record.details["budget_status"] += "; kept by --keep-over-budget"


def _choose_within_budget(manifest: Manifest, options: BuildOptions) -> None:
    manifest.notes = [n for n in manifest.notes if not n.startswith(BUDGET_NOTE)]
    if options.accuracy_budget is None and options.kl_budget is None:
        return
    within = []
    for p, record in manifest.variants.items():
        if record.details.get("budget_met") is False:
            continue
        s = _primary(record, options)
        within.append((s.decode_tok_s if s else 0.0, p))
    if not within:
        manifest.notes.append(f"{BUDGET_NOTE}no variant within it")
        return
    tok_s, best = max(within)
    for p, record in manifest.variants.items():
        record.details["fastest_within_budget"] = p == best
    speed_text = f"{tok_s:.1f} tok/s" if tok_s else "speed not measured"
    manifest.notes.append(
        f"{BUDGET_NOTE}fastest variant within it: {best} ({speed_text}; within: "
        f"{', '.join(p for _, p in sorted(within, reverse=True))})"
    )


def _install(
    record: VariantRecord, genai: Path, options: BuildOptions, repo: Path, work: Path
) -> None:
    staged = work / record.triton_name
    layout.copy_model_py(staged)
    genai_build.install_copy(genai, layout.genai_dir(staged))
    write_config(staged, layout.model_config(record.triton_name, options.instance_count))
    install(staged, repo / record.triton_name, work / "replaced")
