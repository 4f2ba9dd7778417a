"""The ``slo`` policy against ``fixed`` on one load ramp, in one command (issue 17, item 4).

    python -m lab.slo_ramp --repository model_repository --model minilm --out reports/slo/

1. Calibrate on a gateway with default routing: closed-loop capacity (requests/s at
   ``--calibration-users``) of the most accurate variant (the reference, fp32) and of the
   fastest variant within the accuracy budget (the ``slo`` ladder's last whole rung).
2. A ramp from half the reference's capacity up to a peak between the two capacities
   (``--peak``, a fraction of the way from one to the other), held, and back down; paced users
   (``--peak-users`` at the peak), so the offered load follows the users.
3. The same ramp twice: a gateway with ``fixed`` on the reference, then one with ``slo``
   (objective ``--objective-ms``, default ``--objective-x`` x the reference's service time at
   capacity; budget ``--budget``). The ``slo`` gateway's /metrics are scraped every 2 s.
4. report.md, timeline.json and timeline.png in ``--out``, with the machine, its load average
   and each "must show" check stated as met or not.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from loadtest import promtext
from loadtest.errors import LoadTestError
from loadtest.runner import Step, StepSettings, run_step
from loadtest.schedule import Schedule, parse_schedule
from loadtest.scheduled import run_schedule, write_schedule_report
from loadtest.timeline import Bin, Timeline, first_shift, within_objective

SCRAPE_EVERY_S = 2.0


@dataclass
class RampPlan:
    reference: str
    fast: str
    capacity: dict[str, float]  # requests/s, closed loop at the calibration users
    p50_ms: dict[str, float]
    objective_ms: float
    user_rate: float
    low_users: int
    peak_users: int
    schedule: Schedule
    phases: dict[str, tuple[float, float]] = field(default_factory=dict)  # name -> (from, to) s


def plan_ramp(
    reference: str,
    fast: str,
    capacity: dict[str, float],
    p50_ms: dict[str, float],
    args: argparse.Namespace,
) -> RampPlan:
    cap_ref, cap_fast = capacity[reference], capacity[fast]
    peak_rate = cap_ref + args.peak * max(cap_fast - cap_ref, 0.0)
    rate = peak_rate / args.peak_users  # per user
    low = max(1, round(0.5 * cap_ref / rate))
    h, r, p = args.hold, args.ramp, args.peak_hold
    text = f"ramp:{low}-{low}:{h},ramp:{low}-{args.peak_users}:{r},"
    text += f"ramp:{args.peak_users}-{args.peak_users}:{p},ramp:{args.peak_users}-{low}:{r},"
    text += f"ramp:{low}-{low}:{h}"
    objective = args.objective_ms or args.objective_x * 1000.0 / cap_ref
    phases = {
        "low": (0, h),
        "rise": (h, h + r),
        "peak": (h + r, h + r + p),
        "fall": (h + r + p, h + 2 * r + p),
        "low again": (h + 2 * r + p, 2 * h + 2 * r + p),
    }
    return RampPlan(
        reference, fast, capacity, p50_ms, objective, rate, low, args.peak_users,
        parse_schedule(text), phases,
    )  # fmt: skip


class Scraper:
    """The slo gauges of a gateway every few seconds, in a thread."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.samples: list[tuple[float, dict[str, float], float]] = []  # t, shares, exp. loss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Scraper:
        self._t0 = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(SCRAPE_EVERY_S):
            try:
                s = promtext.scrape(self.url)
            except promtext.ScrapeError:
                continue
            shares = promtext.by_label(
                s, "precision_serve_slo_share", "precision", model=self.model
            )
            loss = promtext.total(s, "precision_serve_slo_expected_accuracy_loss", model=self.model)
            self.samples.append((time.time() - self._t0, shares, loss))


def _gateway(repo: Path, routing: dict | None, work: Path, name: str):  # type: ignore[no-untyped-def]
    from server.runtime.runner import GatewayProcess

    args: list[str] = []
    if routing is not None:
        path = work / f"routing-{name}.yaml"
        path.write_text(yaml.safe_dump(routing))
        args = ["--routing", str(path)]
    return GatewayProcess(repo, args, timeout=180)


def calibrate(args: argparse.Namespace, precisions: list[str], work: Path, log) -> tuple:  # type: ignore[no-untyped-def]
    capacity, p50 = {}, {}
    with _gateway(args.repository, None, work, "calibration") as gw:
        settings = StepSettings(
            model=args.model,
            target=gw.grpc_url,
            repository=args.repository,
            duration_s=args.calibrate,
            warmup_s=3,
            work_dir=work / "calibration",
        )
        for p in precisions:
            r = run_step(Step(p, args.calibration_users, 1), settings)
            capacity[p], p50[p] = r.requests_per_s, r.latency_ms["p50"] or 0.0
            log(f"calibration {p}: {r.requests_per_s:.1f} req/s at {args.calibration_users} users")
    return capacity, p50


def _mean_shares(bins: list[Bin], t0: float, t1: float) -> dict[str, float]:
    sel = [b for b in bins if t0 <= b.t_s < t1 and b.shares]
    out: dict[str, float] = {}
    for b in sel:
        for p, s in b.shares.items():
            out[p] = out.get(p, 0.0) + s / len(sel)
    return out


def _fmt_mix(mix: dict[str, float]) -> str:
    return ", ".join(f"{p} {100 * s:.0f}%" for p, s in sorted(mix.items())) or "-"


def verdicts(
    plan: RampPlan, fixed: Timeline, slo: Timeline, budget: float, server_loss: float | None
) -> list[str]:
    obj = plan.objective_ms
    shifted = first_shift(slo.bins, plan.reference)
    after = (shifted if shifted is not None else 0.0) + slo.bin_s
    fixed_over = any(b.p99_ms and b.p99_ms > obj for b in fixed.bins)
    met = within_objective(slo.bins, obj, after_s=after)
    fixed_met = within_objective(fixed.bins, obj, after_s=after)
    peak = _mean_shares(slo.bins, *plan.phases["peak"])
    low = _mean_shares(slo.bins, *plan.phases["low"])
    back = _mean_shares(slo.bins, *plan.phases["low again"])
    losses = [b.expected_loss for b in slo.bins if b.expected_loss is not None]
    client_loss = max(losses) if losses else None

    def mark(ok: bool) -> str:
        return "met" if ok else "NOT met"

    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    loss_ok = client_loss is not None and client_loss <= budget + 1e-9
    loss_ok = loss_ok and (server_loss or 0.0) <= budget + 1e-9

    fast_peak, fast_back = peak.get(plan.fast, 0.0), back.get(plan.fast, 0.0)
    return [
        f"fixed {plan.reference}: p99 over the {obj:.0f} ms objective in some bin: "
        f"{mark(fixed_over)} (within it in {100 * (fixed_met or 0):.0f}% of bins after "
        f"{after:g} s)",
        f"slo: p99 within the objective in {100 * (met or 0):.0f}% of bins after the first "
        f"adaptation ({after:g} s; >= 90%: {mark((met or 0) >= 0.9)})",
        f"slo mix: low {_fmt_mix(low)}; peak {_fmt_mix(peak)}; low again {_fmt_mix(back)} "
        f"(shifts toward {plan.fast} as load rises: {mark(fast_peak > low.get(plan.fast, 0.0))}; "
        f"and back as it falls: {mark(fast_back < fast_peak)})",
        f"slo expected accuracy loss: max per bin {num(client_loss)} (client-side mix x manifest "
        f"loss), max scraped gauge {num(server_loss)}; budget {budget:g}: {mark(loss_ok)}",
    ]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m lab.slo_ramp", description=__doc__.split("\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--model", default="minilm")
    p.add_argument("--out", type=Path, default=Path("reports/slo"))
    p.add_argument("--budget", type=float, default=1.0, help="accuracy budget (manifest points)")
    p.add_argument("--objective-ms", type=float, help="p99 objective (default: --objective-x)")
    p.add_argument("--objective-x", type=float, default=8.0, help="x reference service time")
    p.add_argument("--peak", type=float, default=0.5, help="peak: this far from ref to fast cap")
    p.add_argument("--peak-users", type=int, default=16)
    p.add_argument("--calibration-users", type=int, default=8)
    p.add_argument("--calibrate", type=int, default=15, help="seconds per calibration step")
    p.add_argument("--hold", type=int, default=30, help="seconds at low load, start and end")
    p.add_argument("--ramp", type=int, default=60, help="seconds of each ramp")
    p.add_argument("--peak-hold", type=int, default=60, help="seconds at the peak")
    p.add_argument("--bin", type=float, default=5.0)
    p.add_argument("--note", help="a sentence on the host for the report header")
    args = p.parse_args(argv)
    try:
        return _run(args, argv)
    except (LoadTestError, OSError, RuntimeError) as e:
        print(f"slo_ramp: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    from builder.hostinfo import cpu_info
    from loadtest.report import host_line, variant_info
    from server.catalog import load_repository
    from server.routing.slo import ceiling, ladder

    rungs = ladder(load_repository(args.repository).models[args.model])
    whole = int(ceiling(rungs, args.budget))
    reference, fast = rungs[0].precision, rungs[whole].precision
    if reference == fast:
        raise LoadTestError(f"{args.model}: no faster variant within budget {args.budget}")
    out = args.out
    work = out / "runs"  # Locust logs and records (not meant for git: runs/.gitignore)
    work.mkdir(parents=True, exist_ok=True)
    (work / ".gitignore").write_text("*\n")
    load_before = os.getloadavg()
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    capacity, p50 = calibrate(args, [reference, fast], work, print)
    plan = plan_ramp(reference, fast, capacity, p50, args)
    print(
        f"objective {plan.objective_ms:.0f} ms; schedule {plan.schedule.text} "
        f"at {plan.user_rate:.2f}/s/user"
    )
    variants, _ = variant_info(args.repository, args.model)
    losses = {p: v.accuracy_loss for p, v in variants.items()}
    routings = {
        f"fixed {reference}": {"models": {args.model: {"policy": "fixed", "precision": reference}}},
        "slo": {
            "models": {
                args.model: {
                    "policy": "slo",
                    "slo": {"p99_ms": round(plan.objective_ms, 1), "accuracy_budget": args.budget},
                }
            }
        },
    }
    timelines = []
    server_loss: float | None = None
    for label, routing in routings.items():
        with _gateway(args.repository, routing, out, label.split()[0]) as gw:
            settings = StepSettings(
                model=args.model,
                target=gw.grpc_url,
                repository=args.repository,
                duration_s=int(plan.schedule.duration_s),
                warmup_s=0,
                work_dir=work,
            )
            print(f"{label}: {plan.schedule.duration_s:.0f} s ramp ...")
            with Scraper(gw.metrics_url, args.model) as scraper:
                tl = run_schedule(
                    settings, "policy", plan.schedule, plan.user_rate, label, args.bin, losses
                )
            timelines.append(tl)
            if label == "slo" and scraper.samples:
                server_loss = max(s[2] for s in scraper.samples)
    fixed, slo = timelines
    checks = verdicts(plan, fixed, slo, args.budget, server_loss)
    load_after = os.getloadavg()
    header = [
        f"# slo vs fixed on a load ramp: {args.model}",
        "",
        f"Run {started} on {host_line(dict(cpu_info()))}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after (the load generator, Locust, "
        "runs on the same cores). " + (args.note or "Other jobs on the host move capacities "
        "and latencies from minute to minute: read the figures as one noisy run."),
        "",
        f"Command: `{shlex.join(['python', '-m', 'lab.slo_ramp', *argv])}`",
        "",
        "## Plan",
        "",
        f"- calibration (closed loop, {args.calibration_users} users, {args.calibrate} s each): "
        + "; ".join(
            f"{p} {capacity[p]:.1f} req/s (p50 {p50[p]:.0f} ms)" for p in (reference, fast)
        ),
        f"- ladder within budget {args.budget:g}: "
        + " -> ".join(f"{r.precision} (loss {r.loss:.3f})" for r in rungs)
        + f"; the fastest variant within the budget: {fast}",
        f"- ramp: {plan.low_users} users (half of {reference}'s capacity) -> {plan.peak_users} "
        f"users (peak {plan.user_rate * plan.peak_users:.1f} req/s offered, between "
        f"{capacity[reference]:.1f} and {capacity[fast]:.1f}) -> back; each user paced at "
        f"{plan.user_rate:.2f} req/s; schedule `{plan.schedule.text}`",
        f"- objective p99 {plan.objective_ms:.0f} ms"
        + ("" if args.objective_ms else f" ({args.objective_x:g} x {reference}'s 1/capacity)"),
        "",
        "## Checks",
        "",
        *(f"- {c}" for c in checks),
    ]  # fmt: skip
    paths = write_schedule_report(out, timelines, header, plan.objective_ms, args.budget)
    print(*checks, sep="\n")
    print(f"report: {paths['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
