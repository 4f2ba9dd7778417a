"""PNG plots of a load test (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loadtest.runner import StepResult


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
