"""A load test that follows a schedule of users over time (``--schedule``) instead of steps.

One Locust run per precision (``policy``: let the gateway's routing policy choose), each with
``loadtest/schedule_shape.py`` loaded next to the user class; every request's timing and served
precision is recorded and binned over time (loadtest/timeline.py), and the report plots p99
against the objective, throughput and the precision mix over time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtest.runner import (
    LOCUSTFILE,
    STOP_TIMEOUT_S,
    StepSettings,
    locust_args,
    locust_prefix,
    run_locust,
)
from loadtest.schedule import Schedule
from loadtest.timeline import Timeline, bin_record, load_record, within_objective

SHAPEFILE = LOCUSTFILE.with_name("schedule_shape.py")


def schedule_command(
    s: StepSettings,
    precision: str,
    schedule: Schedule,
    user_rate: float,
    csv_prefix: Path,
    record: Path,
) -> list[str]:
    return [
        *locust_prefix(f"{LOCUSTFILE},{SHAPEFILE}"),
        "--schedule",
        schedule.text,
        "--user-rate",
        str(user_rate),
        *locust_args(s, precision, csv_prefix, record),
    ]


def run_schedule(
    s: StepSettings,
    precision: str,
    schedule: Schedule,
    user_rate: float,
    label: str,
    bin_s: float,
    losses: dict[str, float | None] | None = None,
) -> Timeline:
    """One scheduled Locust run against ``s.target``; its requests binned over time."""
    work = Path(s.work_dir) / label.replace(" ", "_")
    work.mkdir(parents=True, exist_ok=True)
    record = work / "record.npz"
    record.unlink(missing_ok=True)
    cmd = schedule_command(s, precision, schedule, user_rate, work / "locust", record)
    run_locust(cmd, work / "locust.log", schedule.duration_s + 60 + STOP_TIMEOUT_S)
    return bin_record(load_record(record), label, bin_s, schedule, losses)


@dataclass
class ScheduledOutcome:
    timelines: list[Timeline]
    paths: dict[str, Path]
    summary: list[str]

    @property
    def comparison_table(self) -> str:
        return "\n".join(self.summary)

    @property
    def recommendations(self) -> list[str]:
        return []


def summarise(timelines: Sequence[Timeline], objective_ms: float | None) -> list[str]:
    lines = []
    for tl in timelines:
        p99s = [b.p99_ms for b in tl.bins if b.p99_ms is not None]
        worst = max(p99s) if p99s else float("nan")
        line = f"{tl.label}: {len(tl.bins)} bins of {tl.bin_s:g}s, worst bin p99 {worst:.1f} ms"
        if objective_ms:
            met = within_objective(tl.bins, objective_ms)
            line += f", p99 within {objective_ms:g} ms in {100 * (met or 0):.0f}% of bins"
        lines.append(line)
    return lines


def write_schedule_report(
    out: Path,
    timelines: Sequence[Timeline],
    header: Sequence[str],
    objective_ms: float | None,
    budget: float | None = None,
    extra: Sequence[str] = (),
) -> dict[str, Path]:
    from loadtest.plots import write_timeline_plot

    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "timeline.json", "report": out / "report.md"}
    doc = {"objective_ms": objective_ms, "budget": budget, "runs": [t.to_dict() for t in timelines]}
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n")
    paths["plot"] = write_timeline_plot(out / "timeline.png", timelines, objective_ms, budget)
    parts = [*header, "", *extra, ""]
    for tl in timelines:
        parts += [f"## {tl.label}", "", timeline_table(tl, objective_ms), ""]
    parts += [f"![timeline]({paths['plot'].name})", ""]
    paths["report"].write_text("\n".join(parts))
    return paths


def timeline_table(tl: Timeline, objective_ms: float | None) -> str:
    precisions = sorted({p for b in tl.bins for p in b.shares})
    head = ["t (s)", "users", "req/s ok", "failed", "p99 ms"]
    head += [*(f"{p} %" for p in precisions), "exp. loss"]
    rows = []
    for b in tl.bins:
        p99 = "-" if b.p99_ms is None else f"{b.p99_ms:.1f}"
        if objective_ms and b.p99_ms is not None and b.p99_ms > objective_ms:
            p99 += " (over)"
        rows.append(
            [
                f"{b.t_s:g}",
                "-" if b.users is None else str(b.users),
                f"{b.throughput:.1f}",
                str(b.failures),
                p99,
                *(f"{100 * b.shares.get(p, 0.0):.0f}" for p in precisions),
                "-" if b.expected_loss is None else f"{b.expected_loss:.3f}",
            ]
        )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def run_scheduled(config, log: Callable[[str], None] = print) -> ScheduledOutcome:  # type: ignore[no-untyped-def]
    """``precision-loadtest --schedule``: each of ``config.precisions`` through the schedule."""
    from contextlib import ExitStack

    from builder.hostinfo import cpu_info
    from loadtest.report import host_line, variant_info

    variants, _ = variant_info(config.repository, config.model)
    losses = {p: v.accuracy_loss for p, v in variants.items()}
    timelines = []
    with ExitStack() as stack:
        target = config.target
        if target is None:
            from server.runtime.runner import GatewayProcess

            gw = stack.enter_context(GatewayProcess(config.repository, config.gateway_args))
            target = gw.grpc_url
        settings = StepSettings(
            model=config.model,
            target=target,
            repository=config.repository,
            duration_s=int(config.schedule.duration_s),
            warmup_s=0,
            precision_via=config.precision_via,
            request_timeout_s=config.request_timeout_s,
            work_dir=config.out / "runs",
        )
        for precision in config.precisions:
            log(f"{config.model}/{precision}: schedule {config.schedule.text} ...")
            timelines.append(
                run_schedule(
                    settings,
                    precision,
                    config.schedule,
                    config.user_rate,
                    precision,
                    config.bin_s,
                    losses,
                )
            )
    header = [
        f"# Scheduled load test: {config.model}",
        "",
        f"Schedule `{config.schedule.text}` ({config.user_rate:g} requests/s per user; 0 = "
        f"closed loop) against `{target}`; hardware: {host_line(dict(cpu_info()))}.",
        "",
        f"Command: `{config.command}`",
    ]
    summary = summarise(timelines, config.objective_ms)
    paths = write_schedule_report(
        config.out, timelines, header, config.objective_ms, extra=[f"- {s}" for s in summary]
    )
    return ScheduledOutcome(timelines, paths, summary)
