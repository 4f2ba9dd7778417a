"""Write a load test's output folder: results.json, results.csv, report.md and the plots."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loadtest.runner import StepResult

CSV_FIELDS = (
    "precision",
    "users",
    "batch_size",
    "requests",
    "failures",
    "duration_s",
    "requests_per_s",
    "throughput",
    "p50_ms",
    "p90_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "mean_ms",
    "server_requests",
    "server_p50_ms",
    "server_p99_ms",
    "server_mean_ms",
    "server_queue_mean_ms",
    "server_upstream_mean_ms",
    "server_batch_mean",
)


@dataclass
class VariantInfo:
    """What the manifest says about one precision (None where unknown)."""

    size_mb: float | None = None
    accuracy: float | None = None  # 0..100
    # Points vs FP32, as the builder records it: accuracy points with labels, else
    # 100 x (1 - top-1 agreement) for classifiers and 100 x (1 - mean cosine) for embeddings.
    accuracy_loss: float | None = None
    cosine_mean: float | None = None
    # False when the builder kept the variant although it missed the budget it was built for
    # (--keep-over-budget): never recommended as within a budget.
    budget_met: bool | None = None
    # How a quantization-aware-trained variant was made ("QAT, dynamic INT8"); None otherwise.
    training: str | None = None


@dataclass
class RunInfo:
    model: str
    target: str
    host: dict[str, Any]
    command: str
    duration_s: int
    warmup_s: int
    accuracy_budget: float
    variants: dict[str, VariantInfo] = field(default_factory=dict)
    accuracy_meaningful: bool = True
    inputs: str = ""  # where request inputs came from
    started: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def variant_info(repository: Path | None, model: str) -> tuple[dict[str, VariantInfo], bool]:
    """Per-precision size and quality from the manifest; empty when there is no manifest."""
    if repository is None:
        return {}, True
    from common.model_repository import load_manifest, manifest_path

    path = manifest_path(Path(repository), model)
    if not path.is_file():
        return {}, True
    m = load_manifest(path)
    out = {}
    for p, v in m.variants.items():
        acc = v.quality.get("accuracy")
        out[p] = VariantInfo(
            size_mb=v.size_bytes / 1e6 if v.size_bytes else None,
            accuracy=None if acc is None else 100.0 * acc,
            accuracy_loss=0.0 if p == "fp32" else v.details.get("accuracy_loss"),
            cosine_mean=v.quality.get("cosine_mean"),
            budget_met=v.details.get("budget_met"),
            training=_training(v.details),
        )
    return out, m.accuracy_meaningful


def _training(details: dict[str, Any]) -> str | None:
    qat = details.get("qat")
    if not isinstance(qat, dict):
        return None
    return f"QAT, {qat.get('mode', '?')} INT8"


# ---- the numbers behind the first table and the recommendations -----------------------------
def _served(results: Sequence[StepResult]) -> list[StepResult]:
    return [r for r in results if r.requests > r.failures]


def lightest(results: Sequence[StepResult], precision: str) -> StepResult | None:
    """The lowest-load step of a precision (fewest users, smallest batch): its latency."""
    steps = [r for r in _served(results) if r.precision == precision]
    return min(steps, key=lambda r: (r.users, r.batch_size), default=None)


def peak(results: Sequence[StepResult], precision: str) -> StepResult | None:
    steps = [r for r in _served(results) if r.precision == precision]
    return max(steps, key=lambda r: r.throughput, default=None)


def precisions_of(results: Sequence[StepResult]) -> list[str]:
    return list(dict.fromkeys(r.precision for r in results))


# Below this share of wall-clock time spent in the engine at peak load, the serving path (gateway,
# client, transport) and not the precision decides throughput.
ENDPOINT_BOUND_BELOW = 0.5
# Peak throughputs closer than this fraction are a tie: steps of one run on these shared hosts
# move by more than that (docs/loadtest.md), so the report does not rank them by it.
TIE_WITHIN = 0.05


@dataclass(frozen=True)
class EngineShare:
    """How much of the serving time the engine itself took, from the gateway's own histograms."""

    precision: str
    busy: float  # engine-seconds per wall-clock second at the precision's peak step
    round_trip: float | None  # engine time / client mean round trip at the lightest step


def engine_shares(results: Sequence[StepResult]) -> dict[str, EngineShare]:
    """Per precision; precisions without a server-side view (no /metrics) are left out.

    At the peak step, runs per second = rows per second / mean rows per run, so the engine was
    busy ``throughput / batch_mean * upstream_mean`` of each second.
    """
    out: dict[str, EngineShare] = {}
    for p in precisions_of(results):
        top, light = peak(results, p), lightest(results, p)
        s = (top.server or {}) if top else {}
        upstream, rows = s.get("upstream_mean_ms"), s.get("batch_mean")
        if top is None or light is None or not upstream or not rows:
            continue
        busy = top.throughput / float(rows) * float(upstream) / 1000.0  # type: ignore[arg-type]
        ls = light.server or {}
        mean_rt = light.latency_ms.get("mean")
        engine_light = ls.get("upstream_mean_ms")
        round_trip = float(engine_light) / mean_rt if engine_light and mean_rt else None  # type: ignore[arg-type]
        out[p] = EngineShare(p, busy, round_trip)
    return out


def engine_ms_per_row(results: Sequence[StepResult]) -> dict[str, float]:
    """Engine milliseconds per row at each precision's peak step (gateway histograms)."""
    out: dict[str, float] = {}
    for p in precisions_of(results):
        top = peak(results, p)
        s = (top.server or {}) if top else {}
        upstream, rows = s.get("upstream_mean_ms"), s.get("batch_mean")
        if upstream and rows:
            out[p] = float(upstream) / float(rows)  # type: ignore[arg-type]
    return out


def endpoint_bound(results: Sequence[StepResult]) -> str | None:
    """A plain sentence when the endpoint, not the precision, bounds throughput; else None."""
    shares = engine_shares(results)
    if not shares or any(sh.busy >= ENDPOINT_BOUND_BELOW for sh in shares.values()):
        return None
    parts = []
    for sh in shares.values():
        rt = f", {sh.round_trip:.0%} of a round trip at the lightest load" if sh.round_trip else ""
        parts.append(f"{sh.precision} {sh.busy:.0%}{rt}")
    return (
        "the endpoint, not the precision, bounds throughput here: at peak load the engine was "
        f"busy only {'; '.join(parts)} (gateway histograms); the rest is the gateway, the "
        "client and the transport, so the throughput ranking below does not measure the "
        "precisions (compare the engine times in the server-side table, or run `make bench`)"
    )


def recommendations(results: Sequence[StepResult], info: RunInfo) -> list[str]:
    precs = [p for p in precisions_of(results) if lightest(results, p)]
    if not precs:
        return ["no precision served any request: no recommendation"]
    p50 = {p: lightest(results, p).latency_ms["p50"] for p in precs}  # type: ignore[union-attr]
    tput = {p: peak(results, p).throughput for p in precs}  # type: ignore[union-attr]
    fastest = min(precs, key=lambda p: p50[p])  # type: ignore[arg-type,return-value]
    busiest = max(precs, key=lambda p: tput[p])
    bound = endpoint_bound(results)
    engine_ms = engine_ms_per_row(results)
    lines = [] if bound is None else [bound]
    lines += [
        f"lowest latency: **{fastest}** (p50 {p50[fastest]:.2f} ms at the lightest load)",
        f"highest throughput: **{busiest}** ({tput[busiest]:.0f} inferences/s peak)"
        + (" — endpoint-bound, not evidence for this precision" if bound else "")
        + _tie_note(busiest, precs, tput),
    ]
    budget = info.accuracy_budget
    labelled = any(v.accuracy is not None for v in info.variants.values())
    unit = "pt" if labelled else "pt of 100 x (1 - agreement or cosine)"
    ok = [
        p
        for p in precs
        if info.variants.get(p) is not None
        and info.variants[p].budget_met is not False
        and info.variants[p].accuracy_loss is not None
        and info.variants[p].accuracy_loss <= budget  # type: ignore[operator]
    ]
    if not info.variants:
        lines.append("best within the accuracy budget: unknown (no manifest to read accuracy from)")
    elif not ok:
        lines.append(
            f"best within the accuracy budget ({budget:g} {unit}): none of {', '.join(precs)}"
        )
    elif bound and all(p in engine_ms for p in ok):
        best = min(ok, key=lambda p: engine_ms[p])
        lines.append(
            f"best within the accuracy budget ({budget:g} {unit}): **{best}** by engine time "
            f"({engine_ms[best]:.3f} ms per row at peak, {_loss(info.variants[best])}; "
            "throughput is endpoint-bound)"
        )
    else:
        tied = _tied(ok, tput, max(tput[p] for p in ok))
        best = min(tied, key=lambda p: p50[p])  # type: ignore[arg-type,return-value]
        why = ""
        if len(tied) > 1:
            others = _rates([p for p in tied if p != best], tput)
            why = (
                f"; tied on throughput with {others} (within {TIE_WITHIN:.0%}): the lower p50 "
                f"at the lightest load decides ({p50[best]:.2f} ms)"
            )
        lines.append(
            f"best within the accuracy budget ({budget:g} {unit}): **{best}** "
            f"({tput[best]:.0f} inferences/s, {_loss(info.variants[best])}{why})"
        )
    if not info.accuracy_meaningful:
        lines.append("note: the manifest marks accuracy as not meaningful for this model")
    return lines


def _tied(precs: Sequence[str], tput: dict[str, float], top: float) -> list[str]:
    """The precisions whose peak is within TIE_WITHIN of ``top``."""
    return [p for p in precs if tput[p] >= (1 - TIE_WITHIN) * top]


def _rates(precs: Sequence[str], tput: dict[str, float]) -> str:
    return ", ".join(f"{p} {tput[p]:.0f}/s" for p in precs)


def _tie_note(top: str, precs: Sequence[str], tput: dict[str, float]) -> str:
    """'' unless other precisions' peaks are within TIE_WITHIN of ``top``'s."""
    tied = [p for p in _tied(precs, tput, tput[top]) if p != top]
    if not tied:
        return ""
    return f" — a tie with {_rates(tied, tput)}: within {TIE_WITHIN:.0%}, closer than steps move"


# ---- formatting ----------------------------------------------------------------------------
def _loss(v: VariantInfo) -> str:
    if v.accuracy_loss is None:
        return "loss unknown"
    return f"{v.accuracy_loss:.2f} pt below fp32"


def _mb(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f}" if x >= 1 else f"{x:.3f}"


def _f(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def comparison_rows(results: Sequence[StepResult], info: RunInfo) -> list[list[str]]:
    rows = []
    for p in precisions_of(results):
        v = info.variants.get(p, VariantInfo())
        light, top = lightest(results, p), peak(results, p)
        if v.accuracy is not None:
            acc = f"{v.accuracy:.2f} % ({_f(-v.accuracy_loss if v.accuracy_loss else 0.0)} pt)"
        elif v.cosine_mean is not None:
            acc = f"cosine {v.cosine_mean:.4f}"
        else:
            acc = "-"
        rows.append(
            [
                p if v.training is None else f"{p} ({v.training})",
                _mb(v.size_mb),
                acc,
                "-" if top is None else f"{top.throughput:.0f} (u{top.users}, b{top.batch_size})",
                "-"
                if light is None
                else f"{_f(light.latency_ms['p50'])} / {_f(light.latency_ms['p99'])}",
            ]
        )
    return rows


def comparison_table(results: Sequence[StepResult], info: RunInfo) -> str:
    users = min((r.users for r in results), default=1)
    batch = min((r.batch_size for r in results), default=1)
    headers = [
        "precision",
        "model MB",
        "accuracy (vs fp32)",
        "peak inferences/s (users, batch)",
        f"p50 / p99 ms ({users} user(s), batch {batch})",
    ]
    return markdown_table(headers, comparison_rows(results, info))


def steps_table(results: Sequence[StepResult]) -> str:
    headers = ["precision", "users", "batch", "requests", "failures", "inferences/s"]
    headers += ["p50 ms", "p90 ms", "p95 ms", "p99 ms", "max ms"]
    rows = [
        [
            r.precision,
            str(r.users),
            str(r.batch_size),
            str(r.requests),
            str(r.failures),
            f"{r.throughput:.1f}",
            *(_f(r.latency_ms[k]) for k in ("p50", "p90", "p95", "p99", "max")),
        ]
        for r in results
    ]
    return markdown_table(headers, rows)


def server_table(results: Sequence[StepResult]) -> str:
    headers = ["precision", "users", "batch", "client requests", "gateway requests"]
    headers += ["client p50 ms", "gateway p50 ms (bucket)", "gateway mean ms"]
    headers += ["queue mean ms", "upstream mean ms", "mean rows/run"]
    rows = []
    for r in results:
        s = r.server or {}
        bucket = s.get("p50_bucket_ms")
        rows.append(
            [
                r.precision,
                str(r.users),
                str(r.batch_size),
                str(r.requests),
                str(s.get("requests", "-")),
                _f(r.latency_ms["p50"]),
                f"{_f(s.get('p50_ms'))} ({_f(bucket[0], 'g')}-{_f(bucket[1], 'g')})"
                if bucket
                else "-",
                _f(s.get("mean_ms")),
                _f(s.get("queue_mean_ms")),
                _f(s.get("upstream_mean_ms")),
                _f(s.get("batch_mean")),
            ]
        )
    return markdown_table(headers, rows)


def host_line(host: dict[str, Any]) -> str:
    flags = ", ".join(host.get("flags", [])) or "none of interest"
    return f"{host.get('model', '?')}, {host.get('cores', '?')} logical cores (ISA: {flags})"


def render_markdown(results: Sequence[StepResult], info: RunInfo, plots: Sequence[Path]) -> str:
    parts = [
        f"# Load test: {info.model}",
        "",
        f"Started {info.started} against `{info.target}`; hardware: {host_line(info.host)}.",
        f"Each step: {info.warmup_s} s warm-up (not counted), then {info.duration_s} s measured; "
        f"closed-loop Locust users over Triton gRPC; inputs: {info.inputs or 'see locust logs'}.",
        "",
        comparison_table(results, info),
        "",
        *(f"- {line}" for line in recommendations(results, info)),
        "",
        "## Every step (client side, Locust)",
        "",
        "Latency over every request of the measured window; inferences/s = successful requests x "
        "batch size / window (first request sent to last response).",
        "",
        steps_table(results),
        "",
        "## Server side for the same windows (gateway /metrics)",
        "",
        "The gateway's /metrics was scraped right before and after each measured run. Gateway "
        "medians are histogram estimates (PromQL histogram_quantile interpolation); their "
        "resolution is the bucket shown. Client latency adds the gRPC round trip and the "
        "Locust client's own time on the same CPU.",
        "",
        server_table(results),
        "",
    ]
    notes = sorted({r.server_note for r in results if r.server_note})
    parts += [f"note: {n}" for n in notes]
    if plots:
        parts += ["## Plots", ""]
        parts += [f"![{p.stem}]({p.name})" for p in plots]
        parts.append("")
    parts += [f"Command: `{info.command}`", ""]
    return "\n".join(parts)


def write_csv(path: Path, results: Sequence[StepResult]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            s = r.server or {}
            w.writerow(
                {
                    "precision": r.precision,
                    "users": r.users,
                    "batch_size": r.batch_size,
                    "requests": r.requests,
                    "failures": r.failures,
                    "duration_s": round(r.duration_s, 4),
                    "requests_per_s": round(r.requests_per_s, 3),
                    "throughput": round(r.throughput, 3),
                    **{
                        f"{k}_ms": _round(r.latency_ms[k])
                        for k in ("p50", "p90", "p95", "p99", "max", "mean")
                    },
                    "server_requests": s.get("requests"),
                    "server_p50_ms": _round(s.get("p50_ms")),
                    "server_p99_ms": _round(s.get("p99_ms")),
                    "server_mean_ms": _round(s.get("mean_ms")),
                    "server_queue_mean_ms": _round(s.get("queue_mean_ms")),
                    "server_upstream_mean_ms": _round(s.get("upstream_mean_ms")),
                    "server_batch_mean": _round(s.get("batch_mean")),
                }
            )


def _round(x: Any) -> Any:
    return None if x is None else round(float(x), 4)


def write_report(out: Path, results: Sequence[StepResult], info: RunInfo) -> dict[str, Path]:
    """Every output file; returns their paths by kind."""
    from loadtest.plots import write_plots

    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "model": info.model,
        "target": info.target,
        "started": info.started,
        "command": info.command,
        "host": info.host,
        "duration_s": info.duration_s,
        "warmup_s": info.warmup_s,
        "accuracy_budget": info.accuracy_budget,
        "inputs": info.inputs,
        "variants": {p: vars(v) for p, v in info.variants.items()},
        "recommendations": recommendations(results, info),
        "steps": [r.to_dict() for r in results],
    }
    paths = {"json": out / "results.json", "csv": out / "results.csv", "report": out / "report.md"}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    write_csv(paths["csv"], results)
    plots = write_plots(out, results)
    paths.update({p.stem: p for p in plots})
    paths["report"].write_text(render_markdown(results, info, plots))
    return paths
