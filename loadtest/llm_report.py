"""The report of an LLM load test: precisions ranked by output tokens/s and by time to first
token, each with its quality cost from the manifest (perplexity ratio, KL, top-1 agreement vs
fp32), and a line that says whether the client or the model bounds the figures.

Client-bound criterion (docs/loadtest.md, "LLMs"): a step is client-bound when either
- Locust's process used at least :data:`CLIENT_CPU_BOUND` of a core over the run (Locust runs
  its users on one thread: near a full core it is the bottleneck, whatever the gateway does), or
- the gateway's own histograms show it held the users' requests for less than
  :data:`SERVER_SHARE_BELOW` of their wall-clock time: in a closed loop each user is always
  either waiting on the gateway (TTFT + every later token's ITL, summed over its requests) or
  busy in the client and the transport, so ``gateway seconds / (users x window)`` below one half
  means most of the time went to the client side.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadtest.llm_runner import LlmStepResult
from loadtest.llm_stream import APIS
from loadtest.report import RunInfo, host_line, markdown_table

CLIENT_CPU_BOUND = 0.8  # cores of Locust's single thread
SERVER_SHARE_BELOW = 0.5  # gateway seconds per user-second
TIE_WITHIN = 0.05  # as loadtest.report: closer than steps move on these hosts


@dataclass
class LlmVariantInfo:
    """A precision's size and quality cost from the manifest (None where unknown)."""

    size_mb: float | None = None
    ppl: float | None = None
    ppl_ratio: float | None = None
    kl_mean: float | None = None
    top1_agreement: float | None = None
    build_tok_s: float | None = None  # the builder's decode tok/s of one sequence


def llm_variant_info(repository: Path | None, model: str) -> tuple[dict[str, LlmVariantInfo], str]:
    """Per precision, and what the quality was measured on (the manifest's eval text and
    reference note); empty when there is no manifest."""
    if repository is None:
        return {}, ""
    from common.model_repository import load_manifest, manifest_path

    path = manifest_path(Path(repository), model)
    if not path.is_file():
        return {}, ""
    m = load_manifest(path)
    out: dict[str, LlmVariantInfo] = {}
    for p, v in m.variants.items():
        rec = v.llm
        info = LlmVariantInfo(size_mb=v.size_bytes / 1e6 if v.size_bytes else None)
        if rec is not None:
            info.ppl, info.ppl_ratio = rec.ppl, rec.ppl_ratio
            info.kl_mean, info.top1_agreement = rec.kl_mean, rec.top1_agreement
            info.build_tok_s = max((s.decode_tok_s for s in rec.speed), default=None)
        out[p] = info
    source = ""
    if m.llm is not None:
        source = f"quality on {m.llm.eval_text}"
        if m.llm.reference_note:
            source += f"; {m.llm.reference_note}"
    return out, source


def precisions_of(results: Sequence[LlmStepResult]) -> list[str]:
    return list(dict.fromkeys(r.precision for r in results))


def peak(results: Sequence[LlmStepResult], precision: str) -> LlmStepResult | None:
    steps = [r for r in results if r.precision == precision and r.requests > r.failures]
    return max(steps, key=lambda r: r.tokens_per_s, default=None)


def lightest(results: Sequence[LlmStepResult], precision: str) -> LlmStepResult | None:
    steps = [r for r in results if r.precision == precision and r.requests > r.failures]
    return min(steps, key=lambda r: r.users, default=None)


def server_share(r: LlmStepResult) -> float | None:
    """Gateway seconds (TTFT + ITL sums) per user-second of the window; None without metrics."""
    s = r.server or {}
    busy = s.get("busy_s")
    if busy is None or r.duration_s <= 0:
        return None
    return float(busy) / (r.users * r.duration_s)  # type: ignore[arg-type]


def _why_bound(r: LlmStepResult) -> list[str]:
    why = []
    if r.client_cpu_cores is not None and r.client_cpu_cores >= CLIENT_CPU_BOUND:
        why.append(f"Locust used {r.client_cpu_cores:.2f} of a core")
    share = server_share(r)
    if share is not None and share < SERVER_SHARE_BELOW:
        why.append(f"the gateway held the requests for only {share:.0%} of the users' time")
    return why


def client_bound(results: Sequence[LlmStepResult]) -> tuple[bool, str]:
    """(bound, the sentence for the report): whether any step was client-bound, and why."""
    bound = [(r, why) for r in results if (why := _why_bound(r))]
    if bound:
        steps = "; ".join(f"{r.precision} at {r.users} user(s): {', '.join(w)}" for r, w in bound)
        return True, (
            f"**the client, not the model, bounds these figures** in {len(bound)} of "
            f"{len(results)} steps ({steps}; thresholds: {CLIENT_CPU_BOUND:g} of a core for "
            f"Locust's one thread, {SERVER_SHARE_BELOW:.0%} gateway share): their tokens/s and "
            "requests/s measure Locust and the transport, not the precision; use fewer users "
            "per Locust process, or `make bench` for the engine's own figures"
        )
    cpu = [r.client_cpu_cores for r in results if r.client_cpu_cores is not None]
    shares = [s for r in results if (s := server_share(r)) is not None]
    parts = []
    if cpu:
        parts.append(
            f"Locust used at most {max(cpu):.2f} of a core (bound at {CLIENT_CPU_BOUND:g})"
        )
    if shares:
        parts.append(
            f"the gateway held the requests for {min(shares):.0%}-{max(shares):.0%} of the "
            f"users' time (bound below {SERVER_SHARE_BELOW:.0%})"
        )
    else:
        parts.append("no gateway metrics, so only Locust's CPU was checked")
    return False, f"the model, not the client, bounds these figures: {'; '.join(parts)}"


def _cost(v: LlmVariantInfo | None) -> str:
    if v is None or v.ppl_ratio is None:
        return "quality unknown"
    parts = [f"ppl x{v.ppl_ratio:.3f}"]
    if v.kl_mean is not None:
        parts.append(f"KL {v.kl_mean:.3f}")
    if v.top1_agreement is not None:
        parts.append(f"top-1 {v.top1_agreement:.1%}")
    return ", ".join(parts)


def ranking(results: Sequence[LlmStepResult]) -> tuple[list[str], list[str]]:
    """(precisions by peak tokens/s, highest first; by TTFT p50 at the lightest load, lowest
    first); precisions without a successful request are left out."""
    precs = [p for p in precisions_of(results) if peak(results, p)]
    by_tokens = sorted(precs, key=lambda p: -peak(results, p).tokens_per_s)  # type: ignore[union-attr]

    def ttft(p: str) -> float:
        v = lightest(results, p).ttft_ms["p50"]  # type: ignore[union-attr]
        return float("inf") if v is None else v

    return by_tokens, sorted(precs, key=ttft)


def recommendations(
    results: Sequence[LlmStepResult], variants: dict[str, LlmVariantInfo], ppl_budget: float
) -> list[str]:
    by_tokens, by_ttft = ranking(results)
    if not by_tokens:
        return ["no precision served any request: no ranking"]
    bound, line = client_bound(results)
    tput = {p: peak(results, p).tokens_per_s for p in by_tokens}  # type: ignore[union-attr]
    top = by_tokens[0]
    tied = [p for p in by_tokens[1:] if tput[p] >= (1 - TIE_WITHIN) * tput[top]]
    light = {p: lightest(results, p) for p in by_tokens}
    lines = [line]
    lines.append(
        "by output tokens/s: "
        + " > ".join(f"**{p}** {tput[p]:.1f} ({_cost(variants.get(p))})" for p in by_tokens)
        + (f" — {top} ties with {', '.join(tied)} (within {TIE_WITHIN:.0%})" if tied else "")
        + (" — client-bound steps included, see above" if bound else "")
    )
    ttft = [p for p in by_ttft if light[p].ttft_ms["p50"] is not None]  # type: ignore[union-attr]
    lines.append(
        "by time to first token (p50 at the lightest load): "
        + " < ".join(f"**{p}** {light[p].ttft_ms['p50']:.0f} ms" for p in ttft)  # type: ignore[union-attr]
        if ttft
        else "time to first token: no request produced text (each ended before its first "
        "token, e.g. at the end of sequence: try another --prompt or --api chat)"
    )
    within = [
        p
        for p in by_tokens
        if variants.get(p) is not None and variants[p].ppl_ratio is not None
        and variants[p].ppl_ratio <= ppl_budget  # type: ignore[operator]
    ]  # fmt: skip
    if not any(v.ppl_ratio is not None for v in variants.values()):
        lines.append(
            "best within the quality budget: unknown (no manifest, or it records no LLM quality)"
        )
    elif not within:
        lines.append(
            f"best within the quality budget (ppl ratio <= {ppl_budget:g}): none of "
            f"{', '.join(by_tokens)}"
        )
    else:
        best = within[0]
        lines.append(
            f"best within the quality budget (ppl ratio <= {ppl_budget:g}): **{best}** "
            f"({tput[best]:.1f} tokens/s, {_cost(variants[best])})"
        )
    return lines


# ---- formatting ----------------------------------------------------------------------------
def _f(x: Any, spec: str = ".1f") -> str:
    return "-" if x is None else format(float(x), spec)


def _pair(d: dict[str, float | None]) -> str:
    return f"{_f(d['p50'])} / {_f(d['p99'])}"


def comparison_table(results: Sequence[LlmStepResult], variants: dict[str, LlmVariantInfo]) -> str:
    by_tokens, _ = ranking(results)
    users = min((r.users for r in results), default=1)
    headers = ["rank", "precision", "model MB", "ppl (x fp32)", "KL", "top-1"]
    headers += ["peak tokens/s (users)", "requests/s at peak"]
    headers += [f"TTFT p50 / p99 ms ({users} user(s))", f"ITL p50 / p99 ms ({users} user(s))"]
    rows = []
    for i, p in enumerate(by_tokens, 1):
        v = variants.get(p, LlmVariantInfo())
        top, light = peak(results, p), lightest(results, p)
        assert top is not None and light is not None
        ppl = "-" if v.ppl is None else f"{v.ppl:.2f} (x{_f(v.ppl_ratio, '.3f')})"
        rows.append(
            [
                str(i),
                p,
                _f(v.size_mb, ".0f"),
                ppl,
                _f(v.kl_mean, ".3f"),
                "-" if v.top1_agreement is None else f"{v.top1_agreement:.1%}",
                f"{top.tokens_per_s:.1f} (u{top.users})",
                f"{top.requests_per_s:.2f}",
                _pair(light.ttft_ms),
                _pair(light.itl_ms),
            ]
        )
    return markdown_table(headers, rows)


def steps_table(results: Sequence[LlmStepResult]) -> str:
    headers = ["precision", "users", "requests", "failures", "requests/s", "tokens/s"]
    headers += ["TTFT p50 / p99 ms", "ITL p50 / p99 ms", "tokens/request", "tokens/chunk"]
    headers += ["Locust CPU (cores)", "gateway share"]
    rows = []
    for r in results:
        share = server_share(r)
        rows.append(
            [
                r.precision,
                str(r.users),
                str(r.requests),
                str(r.failures),
                f"{r.requests_per_s:.2f}",
                f"{r.tokens_per_s:.1f}",
                _pair(r.ttft_ms),
                _pair(r.itl_ms),
                f"{r.tokens_per_request:.1f}",
                f"{r.tokens_per_chunk:.2f}",
                _f(r.client_cpu_cores, ".2f"),
                "-" if share is None else f"{share:.0%}",
            ]
        )
    return markdown_table(headers, rows)


def server_table(results: Sequence[LlmStepResult]) -> str:
    headers = ["precision", "users", "client requests", "gateway requests", "gateway tokens"]
    headers += ["gateway TTFT p50 / mean ms", "gateway ITL p50 / mean ms", "finish reasons"]
    rows = []
    for r in results:
        s: dict[str, Any] = r.server or {}
        rows.append(
            [
                r.precision,
                str(r.users),
                str(r.requests),
                str(s.get("requests", "-")),
                str(s.get("generated_tokens", "-")),
                f"{_f(s.get('ttft_p50_ms'))} / {_f(s.get('ttft_mean_ms'))}",
                f"{_f(s.get('itl_p50_ms'), '.2f')} / {_f(s.get('itl_mean_ms'), '.2f')}",
                ", ".join(f"{k} {v}" for k, v in (s.get("by_finish") or {}).items()) or "-",
            ]
        )
    return markdown_table(headers, rows)


@dataclass
class LlmRunInfo:
    """RunInfo plus what an LLM run asked for."""

    base: RunInfo
    variants: dict[str, LlmVariantInfo]
    quality_source: str
    api: str
    max_tokens: int
    ppl_budget: float


def render_markdown(
    results: Sequence[LlmStepResult], info: LlmRunInfo, plots: Sequence[Path]
) -> str:
    b = info.base
    parts = [
        f"# Load test: {b.model} (LLM, streamed)",
        "",
        f"Started {b.started} against `{b.target}`; hardware: {host_line(b.host)}.",
        f"Each step: {b.warmup_s} s warm-up (not counted), then {b.duration_s} s measured; "
        f"closed-loop Locust users streaming OpenAI `{APIS[info.api]}` "
        f"(`max_tokens` {info.max_tokens}, greedy unless told otherwise). TTFT: request sent -> "
        "first content chunk; ITL: gaps between content chunks, per token (usage's token "
        "count spread over the chunks after the first); tokens/s: completion tokens of "
        "successful requests / window, all users together.",
        "",
        comparison_table(results, info.variants),
        "",
        *(f"- {line}" for line in recommendations(results, info.variants, info.ppl_budget)),
        "",
    ]
    if info.quality_source:
        parts += [f"Quality figures from the manifest ({info.quality_source}).", ""]
    parts += [
        "## Every step (client side, Locust)",
        "",
        "Locust CPU: the Locust process's CPU seconds / wall seconds over the run (one thread: "
        f"{CLIENT_CPU_BOUND:g} and above means the client bounds the step). Gateway share: the "
        "gateway's TTFT + ITL seconds for the window / (users x window).",
        "",
        steps_table(results),
        "",
        "## Server side for the same windows (gateway /metrics)",
        "",
        "Histogram estimates (PromQL histogram_quantile interpolation) from "
        "`precision_serve_llm_*`, scraped right before and after each measured run.",
        "",
        server_table(results),
        "",
    ]
    notes = sorted({r.server_note for r in results if r.server_note})
    parts += [f"note: {n}" for n in notes]
    if plots:
        parts += ["## Plots", "", *(f"![{p.stem}]({p.name})" for p in plots), ""]
    parts += [f"Command: `{b.command}`", ""]
    return "\n".join(parts)


CSV_FIELDS = (
    "precision", "users", "requests", "failures", "duration_s", "requests_per_s",
    "output_tokens", "tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
    "latency_p50_ms", "tokens_per_request", "client_cpu_cores", "gateway_share",
)  # fmt: skip


def write_csv(path: Path, results: Sequence[LlmStepResult]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            share = server_share(r)
            w.writerow(
                {
                    "precision": r.precision,
                    "users": r.users,
                    "requests": r.requests,
                    "failures": r.failures,
                    "duration_s": round(r.duration_s, 3),
                    "requests_per_s": round(r.requests_per_s, 4),
                    "output_tokens": r.output_tokens,
                    "tokens_per_s": round(r.tokens_per_s, 3),
                    "ttft_p50_ms": r.ttft_ms["p50"],
                    "ttft_p99_ms": r.ttft_ms["p99"],
                    "itl_p50_ms": r.itl_ms["p50"],
                    "itl_p99_ms": r.itl_ms["p99"],
                    "latency_p50_ms": r.latency_ms["p50"],
                    "tokens_per_request": round(r.tokens_per_request, 2),
                    "client_cpu_cores": r.client_cpu_cores,
                    "gateway_share": None if share is None else round(share, 4),
                }
            )


def write_llm_report(
    out: Path, results: Sequence[LlmStepResult], info: LlmRunInfo
) -> dict[str, Path]:
    from loadtest.plots import write_llm_plots

    out.mkdir(parents=True, exist_ok=True)
    b = info.base
    bound, _ = client_bound(results)
    by_tokens, by_ttft = ranking(results)
    doc = {
        "kind": "llm",
        "model": b.model,
        "target": b.target,
        "started": b.started,
        "command": b.command,
        "host": b.host,
        "duration_s": b.duration_s,
        "warmup_s": b.warmup_s,
        "api": info.api,
        "max_tokens": info.max_tokens,
        "ppl_budget": info.ppl_budget,
        "quality_source": info.quality_source,
        "variants": {p: vars(v) for p, v in info.variants.items()},
        "ranking": {"tokens_per_s": by_tokens, "ttft": by_ttft},
        "client_bound": bound,
        "recommendations": recommendations(results, info.variants, info.ppl_budget),
        "steps": [r.to_dict() for r in results],
    }
    paths = {"json": out / "results.json", "csv": out / "results.csv", "report": out / "report.md"}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    write_csv(paths["csv"], results)
    plots = write_llm_plots(out, results)
    paths.update({p.stem: p for p in plots})
    paths["report"].write_text(render_markdown(results, info, plots))
    return paths
