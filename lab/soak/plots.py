"""PNG plots of a soak (matplotlib, Agg backend): latency per window, RSS and fds over time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lab.soak.report import MB


def write_plots(out: Path, report: dict[str, Any]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    windows = report["windows"]
    fig, ax = plt.subplots(figsize=(8, 4))
    ts = [w.t for w in windows]
    ax.plot(ts, [w.p50_ms for w in windows], "o-", label="p50")
    ax.plot(ts, [w.p99_ms for w in windows], "x--", label="p99")
    for kill in [report["triton"].get("killed_at")]:
        if kill is not None:
            ax.axvline(kill, color="red", alpha=0.5, label="replica killed")
    ax.set(
        xlabel="s since the paced phase began",
        ylabel="latency (ms)",
        yscale="log",
        title="Valid requests, per 10 s window",
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    paths.append(_save(fig, out / "soak_latency.png"))

    samples = report["samples"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    top.plot([s.t for s in samples], [s.rss_bytes / MB for s in samples])
    top.set(ylabel="RSS (MB)", title="Gateway resident memory and open fds")
    bottom.plot([s.t for s in samples], [s.fds for s in samples], color="tab:orange")
    bottom.set(xlabel="s (sampler clock)", ylabel="open fds")
    for ax in (top, bottom):
        for name, t in report["phases"].items():
            ax.axvline(t, color="grey", alpha=0.4, linestyle=":")
            if ax is top:
                ax.annotate(
                    name,
                    (t, 1),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    rotation=90,
                    va="top",
                )
        ax.grid(True, alpha=0.3)
    paths.append(_save(fig, out / "soak_resources.png"))
    return paths


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
