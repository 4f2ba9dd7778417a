"""The summary table printed at the end of a build (and by the demo)."""

from __future__ import annotations

from builder.sources.common import DATA_NOTE_PREFIX
from common.model_repository import LLM_TASK, Manifest


def _fmt(value: float | None, spec: str, empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def budget_cell(details: dict) -> str:
    """'-' without a budget; 'met' or 'NOT MET' for the --accuracy-budget it was built for."""
    if details.get("accuracy_budget") is None:
        return "-"
    return "met" if details.get("budget_met") is not False else "NOT MET"


def smooth_cell(details: dict) -> str:
    """The SmoothQuant alpha an INT8 variant was rescaled with ('-': none)."""
    sq = details.get("smoothquant")
    alpha = sq.get("alpha") if isinstance(sq, dict) else None
    return "-" if alpha is None else f"{alpha:g}"


def qat_line(precision: str, details: dict) -> str | None:
    """How a quantization-aware-trained variant was made, for the summary (None otherwise)."""
    q = details.get("qat")
    if not isinstance(q, dict):
        return None
    reused = ", trained result reused from the cache" if q.get("cache_hit") else ""
    cpu = f" ({q['cpu_seconds']} CPU-s)" if q.get("cpu_seconds") is not None else ""
    sq = details.get("smoothquant") or {}
    start = (
        f", from the SmoothQuant-rescaled model (alpha {sq['alpha']:g})"
        if sq.get("alpha") is not None
        else ""
    )
    kept = (
        f", weights of step {q.get('best_step')} kept (best on {q['held_out_rows']} held-out rows)"
        if q.get("held_out_rows")
        else ""
    )
    return (
        f"{precision} is quantization-aware trained ({q.get('mode')} INT8, {q.get('steps')} "
        f"steps of {q.get('batch_size')} on {q.get('data')}, {q.get('objective')}, "
        f"{q.get('seconds')} s{cpu}{start}{kept}{reused}): "
        f"loss vs fp32 {q.get('accuracy_loss_before')} pts "
        f"post-training -> {_fmt(details.get('accuracy_loss'), '.3g')} pts"
    )


def summary_rows(manifest: Manifest) -> list[dict[str, str]]:
    fp32 = manifest.variants.get("fp32")
    rows = []
    for precision, v in manifest.variants.items():
        q = v.quality
        mb = v.size_bytes / 1e6
        agreement = q.get("top1_agreement") if manifest.task == "classification" else None
        rows.append(
            {
                "precision": precision,
                "engine": v.engine,
                "MB": f"{mb:.2f}",
                "size vs fp32": _fmt(v.size_bytes / fp32.size_bytes if fp32 else None, ".2f"),
                "accuracy": _fmt(None if q.get("accuracy") is None else 100 * q["accuracy"], ".2f"),
                "top-1 agree": _fmt(None if agreement is None else 100 * agreement, ".1f"),
                "cosine mean": _fmt(q.get("cosine_mean"), ".4f"),
                "loss (pts)": _fmt(v.details.get("accuracy_loss"), ".2f"),
                "kept fp32": str(len(v.details.get("fp32_kept_nodes", []))),
                "smooth a": smooth_cell(v.details),
                "budget": budget_cell(v.details),
                "b1 ms": _fmt(v.speed.get("latency_ms_p50"), ".2f"),
                "items/s": _fmt(v.speed.get("throughput"), ".0f"),
                "x fp32": _fmt(v.speed.get("speedup_vs_fp32"), ".2f"),
            }
        )
    return rows


def format_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no variants)"
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers}
    line = "| " + " | ".join(h.ljust(widths[h]) for h in headers) + " |"
    sep = "|" + "|".join("-" * (widths[h] + 2) for h in headers) + "|"
    body = ["| " + " | ".join(r[h].ljust(widths[h]) for h in headers) + " |" for r in rows]
    return "\n".join([line, sep, *body])


def quality_source_line(manifest: Manifest) -> str:
    """Where the quality figures came from (manifest ``quality_source``), e.g.
    ``quality measured on: labelled data (fp32, int8); synthetic (fp16)``."""
    groups: dict[str, list[str]] = {}
    for precision in manifest.variants:
        groups.setdefault(manifest.quality_source(precision), []).append(precision)
    parts = [f"{source} ({', '.join(ps)})" for source, ps in groups.items()]
    return f"quality measured on: {'; '.join(parts) or '-'}"


def llm_rows(manifest: Manifest) -> list[dict[str, str]]:
    """One row per decoder-LLM variant: size, quality vs fp32, speed at 1 thread and at the
    most threads measured."""
    fp32 = manifest.variants.get("fp32")
    threads = sorted({s.threads for v in manifest.variants.values() if v.llm for s in v.llm.speed})
    most = threads[-1] if threads and threads[-1] > 1 else None
    rows = []
    for precision, v in manifest.variants.items():
        llm = v.llm
        one = llm.speed_at(1) if llm else None
        row = {
            "precision": precision,
            "MB": f"{v.size_bytes / 1e6:.1f}",
            "size vs fp32": _fmt(v.size_bytes / fp32.size_bytes if fp32 else None, ".2f"),
            "ppl": _fmt(llm.ppl if llm else None, ".3f"),
            "ppl vs fp32": _fmt(llm.ppl_ratio if llm else None, ".4f"),
            "KL": _fmt(llm.kl_mean if llm else None, ".4f"),
            "top-1 agree": _fmt(100 * llm.top1_agreement if llm else None, ".1f"),
            "budget": budget_cell(v.details),
            "TTFT ms": _fmt(one.ttft_ms if one else None, ".0f"),
            "ITL ms": _fmt(one.itl_ms if one else None, ".1f"),
            "tok/s": _fmt(one.decode_tok_s if one else None, ".1f"),
        }
        if most is not None:
            many = llm.speed_at(most) if llm else None
            row[f"tok/s {most}t"] = _fmt(many.decode_tok_s if many else None, ".1f")
        rows.append(row)
    return rows


def llm_summary(manifest: Manifest) -> str:
    head = f"{manifest.model} (decoder LLM, source {manifest.source})"
    lines = [head, format_table(llm_rows(manifest))]
    info = manifest.llm
    if info is not None:
        lines.append(
            f"quality: vs fp32 on {info.eval_text}, windows of {info.eval_window} tokens "
            "(ppl: perplexity; KL: mean KL(fp32 || variant) in nats; top-1: same most likely "
            "next token)"
        )
        cpu = manifest.host.get("model", "?")
        lines.append(
            f"speed: prompt {info.prompt_tokens} tokens, {info.output_tokens} new tokens, greedy, "
            f"median of runs; TTFT, ITL and tok/s at 1 thread on {cpu} "
            f"({manifest.host.get('cores')} cores"
            + (
                f", load average up to {manifest.host['load_average']:.2f}: BUSY"
                if manifest.host.get("busy")
                else ""
            )
            + ")"
        )
        if info.reference_note:
            lines.append(f"note: {info.reference_note}")
    lines.extend(f"note: {n}" for n in manifest.notes if info is None or n != info.reference_note)
    lines.extend(
        f"note: {p} is over budget: {v.details.get('budget_status')}"
        for p, v in manifest.variants.items()
        if v.details.get("budget_met") is False
    )
    return "\n".join(lines)


def summary(manifest: Manifest) -> str:
    if manifest.task == LLM_TASK:
        return llm_summary(manifest)
    head = f"{manifest.model} ({manifest.task}, source {manifest.source})"
    lines = [head, format_table(summary_rows(manifest)), quality_source_line(manifest)]
    if not manifest.accuracy_meaningful and not any("not meaningful" in n for n in manifest.notes):
        lines.append("note: accuracy figures are not meaningful for this model (random weights).")
    # What INT8 was calibrated and quality judged on stands on its own line ("data: ...").
    lines.extend(n if n.startswith(DATA_NOTE_PREFIX) else f"note: {n}" for n in manifest.notes)
    lines.extend(
        f"note: {p} is over budget: {v.details.get('budget_status')}"
        for p, v in manifest.variants.items()
        if v.details.get("budget_met") is False
    )
    lines.extend(
        f"note: {line}"
        for p, v in manifest.variants.items()
        if (line := qat_line(p, v.details)) is not None
    )
    lines.extend(
        f"engine: {p} {v.details['engine_choice']}"
        for p, v in manifest.variants.items()
        if v.details.get("engine_decision")
    )
    speed_batch = next((v.speed.get("batch_size") for v in manifest.variants.values()), None)
    if speed_batch:
        cpu = manifest.host.get("model", "?")
        lines.append(
            f"speed: batch-1 p50 latency and throughput at batch {int(speed_batch)} on {cpu}"
            f" ({manifest.host.get('cores')} cores"
            + (
                f", load average up to {manifest.host['load_average']:.2f}: BUSY"
                if manifest.host.get("busy")
                else ""
            )
            + ")"
        )
    return "\n".join(lines)
