"""One load-test step: a headless Locust subprocess (warm-up, then the measured run).

Locust is never imported here: it gevent-patches whatever process imports it. Each step runs
``python -m locust -f loadtest/locustfile.py --headless`` twice: a warm-up whose numbers are
thrown away, then the measured run. The gateway's /metrics is scraped between the two and after
the second, so the server-side view covers exactly the measured requests (``--stop-timeout`` lets
in-flight requests finish, so none is cut off on the client after the server counted it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common import process
from loadtest import promtext
from loadtest.errors import StepError

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
PERCENTILES = (50, 90, 95, 99)
STOP_TIMEOUT_S = 15
RUN_TIME_SLACK_S = 60


@dataclass(frozen=True)
class Step:
    precision: str
    users: int
    batch_size: int

    @property
    def slug(self) -> str:
        return f"{self.precision}_u{self.users}_b{self.batch_size}"


@dataclass
class StepSettings:
    """What every step of one run shares."""

    model: str
    target: str  # HOST:PORT of the gRPC endpoint
    repository: Path | None
    duration_s: int
    warmup_s: int
    precision_via: str = "parameter"
    metrics_url: str | None = None
    request_timeout_s: float = 10.0
    work_dir: Path = Path(".")


@dataclass
class StepResult:
    precision: str
    users: int
    batch_size: int
    requests: int
    failures: int
    duration_s: float  # first request sent -> last response received
    requests_per_s: float
    throughput: float  # inferences (rows) per second, successful requests only
    latency_ms: dict[str, float | None]  # p50 p90 p95 p99 max mean, over every request
    errors: dict[str, int] = field(default_factory=dict)  # Locust's failure messages
    warmup_requests: int = 0  # sent before the window (not counted anywhere else)
    server: dict[str, object] | None = None  # promtext.ServerView.to_dict() for the window
    server_note: str = ""

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def locust_args(s: StepSettings, precision: str, csv_prefix: Path, record: Path) -> list[str]:
    """The arguments every Locust run here takes (target, model, precision, CSV and record
    files); :func:`locust_command` and ``loadtest.scheduled`` add how users are driven."""
    args = [
        "--stop-timeout",
        str(STOP_TIMEOUT_S),
        "--host",
        s.target,
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--exit-code-on-error",
        "0",
        "--csv",
        str(csv_prefix),
        "--model",
        s.model,
        "--precision",
        precision,
        "--precision-via",
        s.precision_via,
        "--request-timeout",
        str(s.request_timeout_s),
        "--record",
        str(record),
    ]
    if s.repository is not None:
        args += ["--repository", str(s.repository)]
    return args


def locust_prefix(files: str) -> list[str]:
    """``python -m locust -f FILES --headless``: how every load-test run starts."""
    return [sys.executable, "-m", "locust", "-f", files, "--headless"]


def locust_command(
    step: Step, s: StepSettings, run_s: int, csv_prefix: Path, record: Path
) -> list[str]:
    return [
        *locust_prefix(str(LOCUSTFILE)),
        "--users",
        str(step.users),
        "--spawn-rate",
        str(step.users),
        "--run-time",  # a safety net only: --stop-after ends the run
        f"{run_s + RUN_TIME_SLACK_S}s",
        "--stop-after",
        str(run_s),
        "--json-file",  # <prefix>.json: final statistics once every user stopped (CSV: periodic)
        str(csv_prefix),
        "--batch-size",
        str(step.batch_size),
        *locust_args(s, step.precision, csv_prefix, record),
    ]


def run_locust(cmd: list[str], log_path: Path, limit_s: float) -> None:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    log_path.unlink(missing_ok=True)  # this run's log only
    proc = process.start(cmd, log_path=log_path, env=env)
    try:
        rc = proc.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        process.stop(proc, grace=10)
        raise StepError(f"locust did not finish within {limit_s:.0f}s (log: {log_path})") from None
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-1500:]
        raise StepError(f"locust exited with {rc} (log: {log_path}): {tail}")


def _percentiles(latency_s: np.ndarray) -> dict[str, float | None]:
    if latency_s.size == 0:
        return {k: None for k in ("p50", "p90", "p95", "p99", "max", "mean")}
    ms = latency_s * 1000.0
    out: dict[str, float | None] = {f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES}
    out["max"] = float(ms.max())
    out["mean"] = float(ms.mean())
    return out


def _locust_errors(csv_prefix: Path) -> dict[str, int]:
    import csv

    path = Path(f"{csv_prefix}_failures.csv")
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {row["Error"]: int(row["Occurrences"]) for row in csv.DictReader(f)}


def _count(record: Path) -> int:
    if not record.is_file():
        return 0
    with np.load(record) as d:
        return int(d["ok"].size)


def summarise(step: Step, record: Path, csv_prefix: Path) -> StepResult:
    if not record.is_file():
        raise StepError(f"locust left no record at {record}")
    with np.load(record) as d:
        start, latency, ok = d["start"], d["latency"], d["ok"].astype(bool)
    requests = int(latency.size)
    if requests == 0:
        raise StepError(f"step {step.slug}: no request completed")
    duration = float((start + latency).max() - start.min())
    duration = max(duration, 1e-9)
    good = int(ok.sum())
    return StepResult(
        precision=step.precision,
        users=step.users,
        batch_size=step.batch_size,
        requests=requests,
        failures=requests - good,
        duration_s=duration,
        requests_per_s=requests / duration,
        throughput=good * step.batch_size / duration,
        latency_ms=_percentiles(latency),
        errors=_locust_errors(csv_prefix),
    )


@dataclass
class Measured:
    """Where a step's measured run left its files, and the server's view of its window."""

    work: Path  # the step's folder: record.npz, locust_*.csv, warmup.npz
    window: promtext.Samples | None  # /metrics after minus before; None: not scraped
    note: str  # why the server's view is missing, if it is

    @property
    def record(self) -> Path:
        return self.work / "record.npz"

    @property
    def warmup_requests(self) -> int:
        return _count(self.work / "warmup.npz")


def measure_step(
    step: Step, s: StepSettings, command: Callable[[float, Path, Path], list[str]], slack: float
) -> Measured:
    """Warm up (not counted), scrape, measure, scrape. ``command(seconds, csv prefix, record)``
    is the Locust command line of a run; ``slack``: seconds a run may take beyond its length."""
    work = Path(s.work_dir) / step.slug
    work.mkdir(parents=True, exist_ok=True)
    if s.warmup_s > 0:
        cmd = command(s.warmup_s, work / "warmup", work / "warmup.npz")
        run_locust(cmd, work / "warmup.log", s.warmup_s + slack)
    before = after = None
    note = ""
    if s.metrics_url:
        try:
            before = promtext.scrape(s.metrics_url)
        except promtext.ScrapeError as e:
            note = str(e)
    run_locust(
        command(s.duration_s, work / "locust", work / "record.npz"),
        work / "locust.log",
        s.duration_s + slack,
    )
    if before is not None:
        try:
            after = promtext.scrape(s.metrics_url)  # type: ignore[arg-type]
        except promtext.ScrapeError as e:
            note = str(e)
    window = promtext.delta(before, after) if before is not None and after is not None else None
    return Measured(work, window, note if s.metrics_url else "no metrics endpoint given")


def run_step(step: Step, s: StepSettings) -> StepResult:
    """Warm up (not counted), scrape, measure, scrape; the result of the measured run."""
    measured = measure_step(
        step,
        s,
        lambda seconds, prefix, record: locust_command(step, s, seconds, prefix, record),
        60 + STOP_TIMEOUT_S,
    )
    result = summarise(step, measured.record, measured.work / "locust")
    result.warmup_requests = measured.warmup_requests
    if measured.window is not None:
        result.server = promtext.server_view(measured.window, s.model, step.precision).to_dict()
    result.server_note = measured.note
    return result
