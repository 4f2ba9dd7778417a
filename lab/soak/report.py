"""The soak's figures from recorded calls and process samples, its pass/fail checks, and the
report files (``soak.json`` + ``soak.md``; the plots are in :mod:`lab.soak.plots`).

Everything here is a pure function of what the run recorded, so it is unit-tested with
synthetic samples (lab/tests/test_soak_report.py).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lab.soak.procstat import ProcSample

MB = 1024 * 1024
WINDOW_S = 10.0
RSS_GROWTH_LIMIT_PCT = 5.0
BIG_RSS_LIMIT_MB = 200.0
IN_FLIGHT_LIMIT_MS = 100.0


@dataclass(frozen=True)
class Call:
    """One valid request: start/end in seconds since the paced phase began."""

    start: float
    end: float
    precision: str
    error: str | None = None  # None: answered correctly


@dataclass(frozen=True)
class Window:
    t: float  # window start, seconds since the paced phase began
    requests: int
    errors: int
    p50_ms: float | None
    p99_ms: float | None


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    limit: str
    passed: bool


@dataclass
class ValidSummary:
    sent: int
    ok: int
    errors: int  # outside the killed replica's window: must be 0
    killed_window_errors: int  # in flight on a replica when it was killed
    skipped: int  # not sent: the client's in-flight cap was reached (the gateway fell behind)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    error_examples: list[str] = field(default_factory=list)  # the first few distinct messages
    per_precision: dict[str, dict[str, float]] = field(default_factory=dict)


def percentiles_ms(latencies_s: Sequence[float]) -> tuple[float | None, float | None]:
    if not latencies_s:
        return None, None
    p50, p99 = np.percentile(np.asarray(latencies_s) * 1000.0, [50, 99])
    return round(float(p50), 3), round(float(p99), 3)


def windows(calls: Sequence[Call], duration_s: float, width_s: float = WINDOW_S) -> list[Window]:
    """Requests grouped by start time into ``width_s`` windows over ``[0, duration_s)``;
    percentiles over the successful ones. A request the pacer started at or after the end (a
    late slot) counts in the last window, so the windows hold every request sent."""
    count = max(1, int(np.ceil(duration_s / width_s)))
    buckets: list[list[Call]] = [[] for _ in range(count)]
    for c in calls:
        if c.start >= 0:
            buckets[min(int(c.start // width_s), count - 1)].append(c)
    out = []
    for i, bucket in enumerate(buckets):
        ok = [c.end - c.start for c in bucket if c.error is None]
        p50, p99 = percentiles_ms(ok)
        out.append(Window(i * width_s, len(bucket), len(bucket) - len(ok), p50, p99))
    return out


def in_kill_window(call: Call, kills: Sequence[float]) -> bool:
    """Whether the call was in flight when a replica was killed (start <= kill <= end)."""
    return any(call.start <= k <= call.end for k in kills)


def summarize_valid(
    calls: Sequence[Call], duration_s: float, kills: Sequence[float] = (), skipped: int = 0
) -> ValidSummary:
    failed = [c for c in calls if c.error is not None]
    killed = [c for c in failed if in_kill_window(c, kills)]
    outside = [c for c in failed if not in_kill_window(c, kills)]
    by_kind: dict[str, int] = {}
    for c in outside:
        kind = str(c.error).split(":", 1)[0]
        by_kind[kind] = by_kind.get(kind, 0) + 1
    examples = list(dict.fromkeys(str(c.error) for c in outside))[:5]
    per: dict[str, dict[str, float]] = {}
    for p in sorted({c.precision for c in calls}):
        mine = [c for c in calls if c.precision == p]
        ok = [c.end - c.start for c in mine if c.error is None]
        p50, p99 = percentiles_ms(ok)
        per[p] = {
            "sent": len(mine),
            "ok": len(ok),
            "throughput": round(len(ok) / duration_s, 2) if duration_s > 0 else 0.0,
            "p50_ms": p50 if p50 is not None else float("nan"),
            "p99_ms": p99 if p99 is not None else float("nan"),
        }
    return ValidSummary(
        sent=len(calls),
        ok=len(calls) - len(failed),
        errors=len(outside),
        killed_window_errors=len(killed),
        skipped=skipped,
        errors_by_kind=by_kind,
        error_examples=examples,
        per_precision=per,
    )


@dataclass(frozen=True)
class Growth:
    """Resident memory and open fds: median of the first window after warm-up vs the last."""

    rss_first_mb: float
    rss_last_mb: float
    rss_growth_pct: float
    fds_first: float
    fds_last: float
    fds_growth: float
    samples: int


def growth(
    samples: Sequence[ProcSample], warmup_end: float, end: float, width_s: float = WINDOW_S
) -> Growth | None:
    """None when there are not samples enough after ``warmup_end`` (one per window end)."""
    after = [s for s in samples if warmup_end <= s.t <= end]
    if len(after) < 2:
        return None
    width = min(width_s, (after[-1].t - after[0].t) / 2) or width_s
    first = [s for s in after if s.t <= after[0].t + width]
    last = [s for s in after if s.t >= after[-1].t - width]
    rss0 = float(np.median([s.rss_bytes for s in first])) / MB
    rss1 = float(np.median([s.rss_bytes for s in last])) / MB
    fds0 = float(np.median([s.fds for s in first]))
    fds1 = float(np.median([s.fds for s in last]))
    return Growth(
        rss_first_mb=round(rss0, 1),
        rss_last_mb=round(rss1, 1),
        rss_growth_pct=round((rss1 - rss0) / rss0 * 100.0, 2) if rss0 else 0.0,
        fds_first=fds0,
        fds_last=fds1,
        fds_growth=fds1 - fds0,
        samples=len(after),
    )


def fd_tolerance(first: float) -> float:
    """How many more open fds still count as flat: connections come and go under load."""
    return max(8.0, 0.1 * first)


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def checks(
    valid: ValidSummary,
    grown: Growth | None,
    in_flight: Sequence[dict[str, Any]],
    big: dict[str, Any] | None,
) -> list[Check]:
    """The issue's "Must show" figures, pass/fail each."""
    out: list[Check] = []
    for probe in in_flight:
        worst = probe.get("max_ms")
        out.append(
            Check(
                f"{probe['probe']} while a 60 MB {probe['big']} request is in flight",
                f"max {_ms(worst)} over {probe.get('count', 0)} probes "
                f"({probe.get('errors', 0)} failed)",
                f"< {IN_FLIGHT_LIMIT_MS:.0f} ms",
                worst is not None and worst < IN_FLIGHT_LIMIT_MS and not probe.get("errors"),
            )
        )
    if big is not None:
        delta = big.get("rss_delta_mb")
        done, asked = big.get("answered", 0), big.get("asked", 0)
        out.append(
            Check(
                f"RSS after {asked} rejected 60 MB requests vs baseline",
                f"{'n/a' if delta is None else f'{delta:+.0f} MB'} ({done}/{asked} answered)",
                f"< {BIG_RSS_LIMIT_MB:.0f} MB, all answered",
                delta is not None and delta < BIG_RSS_LIMIT_MB and done == asked,
            )
        )
    if grown is not None:
        out.append(
            Check(
                "RSS growth after warm-up",
                f"{grown.rss_first_mb:.0f} -> {grown.rss_last_mb:.0f} MB "
                f"({grown.rss_growth_pct:+.1f} %)",
                f"< {RSS_GROWTH_LIMIT_PCT:.0f} %",
                grown.rss_growth_pct < RSS_GROWTH_LIMIT_PCT,
            )
        )
        tolerance = fd_tolerance(grown.fds_first)
        out.append(
            Check(
                "open fds after warm-up",
                f"{grown.fds_first:.0f} -> {grown.fds_last:.0f}",
                f"flat (<= +{tolerance:.0f})",
                grown.fds_growth <= tolerance,
            )
        )
    else:
        out.append(Check("RSS growth after warm-up", "n/a (too few samples)", "< 5 %", False))
    out.append(
        Check(
            "valid requests lost (outside a killed replica's in-flight window)",
            f"{valid.errors} errors, {valid.skipped} not sent of {valid.sent + valid.skipped}",
            "0",
            valid.errors == 0 and valid.skipped == 0 and valid.sent > 0,
        )
    )
    return out


def passed(results: Sequence[Check]) -> bool:
    return bool(results) and all(c.passed for c in results)


# ---- files ------------------------------------------------------------------------------------
def to_jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return to_jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_json(path: Path, report: dict[str, Any]) -> Path:
    path.write_text(json.dumps(to_jsonable(report), indent=2) + "\n")
    return path
