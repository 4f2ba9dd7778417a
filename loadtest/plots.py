"""PNG plots of a load test (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.runner import StepResult
from loadtest.timeline import Timeline


def _series(results: Sequence[StepResult]) -> dict[tuple[str, int], list[StepResult]]:
    """Steps grouped by (precision, batch size), ordered by users."""
    out: dict[tuple[str, int], list[StepResult]] = {}
    for r in results:
        out.setdefault((r.precision, r.batch_size), []).append(r)
    return {k: sorted(v, key=lambda r: r.users) for k, v in out.items()}


def _label(precision: str, batch: int, batches: set[int]) -> str:
    return precision if len(batches) == 1 else f"{precision} b{batch}"


def write_plots(out: Path, results: Sequence[StepResult]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(results)
    batches = {r.batch_size for r in results}
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (p, b), steps in series.items():
        ax.plot(
            [r.users for r in steps],
            [r.throughput for r in steps],
            "o-",
            label=_label(p, b, batches),
        )
    ax.set(xlabel="concurrent users", ylabel="inferences / s", title="Throughput vs concurrency")
    _users_axis(ax, results)
    ax.grid(True, alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "throughput_vs_users.png"))

    precisions = list(dict.fromkeys(r.precision for r in results))
    fig, axes = plt.subplots(
        1, len(precisions), figsize=(4 * len(precisions), 4), sharey=True, squeeze=False
    )
    for ax, p in zip(axes[0], precisions, strict=True):
        for (prec, b), steps in series.items():
            if prec != p:
                continue
            xs = [r.users for r in steps]
            for key, style in (("p50", "o-"), ("p90", "s--"), ("p95", "^--"), ("p99", "v:")):
                ax.plot(xs, [r.latency_ms[key] for r in steps], style, label=f"{key} b{b}")
        ax.set(title=p, xlabel="concurrent users")
        _users_axis(ax, results)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("latency (ms)")
    fig.suptitle("Latency percentiles per precision")
    paths.append(_save(fig, out / "latency_percentiles.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (p, b), steps in series.items():
        label = _label(p, b, batches)
        xs = [r.throughput for r in steps]
        line = ax.plot(xs, [r.latency_ms["p50"] for r in steps], "o-", label=f"{label} p50")[0]
        ax.plot(
            xs,
            [r.latency_ms["p99"] for r in steps],
            "x--",
            color=line.get_color(),
            label=f"{label} p99",
        )
        for r in steps:
            ax.annotate(f"u{r.users}", (r.throughput, r.latency_ms["p50"]), fontsize=7)
    ax.set(xlabel="inferences / s", ylabel="latency (ms)", title="Latency vs throughput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    paths.append(_save(fig, out / "latency_throughput.png"))
    return paths


def _users_axis(ax, results: Sequence[StepResult]) -> None:  # type: ignore[no-untyped-def]
    users = sorted({r.users for r in results})
    ax.set_xscale("log", base=2)
    ax.set_xticks(users)
    ax.set_xticklabels([str(u) for u in users])
    ax.minorticks_off()


def _save(fig, path: Path) -> Path:  # type: ignore[no-untyped-def]
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_timeline_plot(
    path: Path,
    timelines: Sequence[Timeline],
    objective_ms: float | None = None,
    budget: float | None = None,
) -> Path:
    """Over time, one line per run: p99 (vs the objective), throughput (and the users asked
    for), the precision mix (share per served precision) and the mix's expected accuracy loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 1, figsize=(9, 11), sharex=True)
    p99_ax, tput_ax, mix_ax, loss_ax = axes
    users_ax = tput_ax.twinx()
    styles = ["-", "--", ":", "-."]
    for i, tl in enumerate(timelines):
        style = styles[i % len(styles)]
        xs = [b.t_s + tl.bin_s / 2 for b in tl.bins]
        p99_ax.plot(xs, [b.p99_ms for b in tl.bins], style, marker=".", label=tl.label)
        tput_ax.plot(xs, [b.throughput for b in tl.bins], style, marker=".", label=tl.label)
        if i == 0 and any(b.users is not None for b in tl.bins):
            users_ax.plot(xs, [b.users for b in tl.bins], color="grey", alpha=0.5, lw=3)
        for p in sorted({p for b in tl.bins for p in b.shares}):
            mix_ax.plot(
                xs,
                [100 * b.shares.get(p, 0.0) if b.shares else None for b in tl.bins],
                style,
                label=f"{tl.label}: {p}",
            )
        loss_ax.plot(xs, [b.expected_loss for b in tl.bins], style, label=tl.label)
    if objective_ms:
        p99_ax.axhline(objective_ms, color="red", lw=1, label=f"objective {objective_ms:.0f} ms")
    if budget is not None:
        loss_ax.axhline(budget, color="red", lw=1, label=f"budget {budget:g}")
    p99_ax.set(ylabel="p99 latency (ms)", title="p99 per bin (client side)")
    p99_ax.set_yscale("log")
    tput_ax.set(ylabel="successful req / s")
    users_ax.set_ylabel("users (grey)")
    mix_ax.set(ylabel="served share (%)", ylim=(-5, 105))
    loss_ax.set(ylabel="expected accuracy loss", xlabel="seconds since the first request")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="upper left")
    return _save(fig, path)


def write_llm_plots(out: Path, results: Sequence[Any]) -> list[Path]:
    """An LLM run (loadtest.llm_runner.LlmStepResult): output tokens/s, TTFT and ITL against
    users per precision, and TTFT p99 against tokens/s (the latency a rate costs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_p: dict[str, list[Any]] = {}
    for r in results:
        by_p.setdefault(r.precision, []).append(r)
    series = {p: sorted(v, key=lambda r: r.users) for p, v in by_p.items()}
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p, steps in series.items():
        ax.plot([r.users for r in steps], [r.tokens_per_s for r in steps], "o-", label=p)
    ax.set(xlabel="concurrent users", ylabel="output tokens / s", title="Tokens/s vs concurrency")
    _users_axis(ax, results)
    ax.grid(True, alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "tokens_vs_users.png"))

    for key, title, name in (
        ("ttft_ms", "Time to first token", "ttft_vs_users.png"),
        ("itl_ms", "Inter-token latency", "itl_vs_users.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for p, steps in series.items():
            xs = [r.users for r in steps]
            line = ax.plot(xs, [getattr(r, key)["p50"] for r in steps], "o-", label=f"{p} p50")[0]
            ax.plot(xs, [getattr(r, key)["p99"] for r in steps], "x--", color=line.get_color(),
                    label=f"{p} p99")  # fmt: skip
        ax.set(xlabel="concurrent users", ylabel="ms", title=f"{title} per precision")
        _users_axis(ax, results)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
        paths.append(_save(fig, out / name))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p, steps in series.items():
        xs = [r.tokens_per_s for r in steps]
        ax.plot(xs, [r.ttft_ms["p99"] for r in steps], "o-", label=p)
        for r in steps:
            ax.annotate(f"u{r.users}", (r.tokens_per_s, r.ttft_ms["p99"] or 0), fontsize=7)
    ax.set(xlabel="output tokens / s", ylabel="TTFT p99 (ms)", title="TTFT p99 vs tokens/s")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    paths.append(_save(fig, out / "ttft_vs_tokens.png"))
    return paths
