"""The soak's report computations on synthetic samples: windows, the killed-replica split,
RSS/fd growth after warm-up, and the pass/fail of each "Must show" check."""

from __future__ import annotations

import json

import pytest

from lab.soak import driver as soak
from lab.soak.procstat import ProcSample
from lab.soak.report import (
    MB,
    Call,
    checks,
    growth,
    passed,
    summarize_valid,
    to_jsonable,
    windows,
)


def _calls() -> list[Call]:
    out = []
    for i in range(100):  # window 0: 100 calls of 1..100 ms
        out.append(Call(i * 0.05, i * 0.05 + (i + 1) / 1000, "fp32"))
    for i in range(10):  # window 1: 10 calls of 5 ms, 2 of them failed
        out.append(Call(10 + i, 10 + i + 0.005, "int8", "UNAVAILABLE: x" if i < 2 else None))
    return out


def test_windows_group_by_start_time_and_take_percentiles_of_successes() -> None:
    got = windows(_calls(), duration_s=30.0)
    assert [w.t for w in got] == [0.0, 10.0, 20.0]
    assert [w.requests for w in got] == [100, 10, 0]
    assert [w.errors for w in got] == [0, 2, 0]
    assert got[0].p50_ms == pytest.approx(50.5, abs=0.01)
    assert got[0].p99_ms == pytest.approx(99.01, abs=0.01)
    assert got[1].p50_ms == pytest.approx(5.0, abs=0.01)
    assert got[2].p50_ms is None and got[2].p99_ms is None


def test_a_request_started_at_the_end_counts_in_the_last_window() -> None:
    """The pacer can start its last slot at (or just after) the scheduled end: the windows
    still hold every request sent."""
    calls = [Call(1.0, 1.1, "fp32"), Call(30.0, 30.1, "fp32"), Call(30.4, 30.5, "fp16")]
    got = windows(calls, duration_s=30.0)
    assert [w.requests for w in got] == [1, 0, 2]
    assert sum(w.requests for w in got) == len(calls)


def test_errors_in_flight_at_a_kill_are_counted_apart() -> None:
    calls = [
        Call(1.0, 1.2, "fp32"),
        Call(4.9, 5.3, "fp32", "UNAVAILABLE: replica gone"),  # in flight at the kill (5.0)
        Call(5.1, 5.2, "fp16", "UNAVAILABLE: after the kill"),  # sent after it: a real loss
        Call(6.0, 6.1, "fp16"),
    ]
    got = summarize_valid(calls, duration_s=10.0, kills=[5.0], skipped=3)
    assert (got.sent, got.ok, got.errors, got.killed_window_errors) == (4, 2, 1, 1)
    assert got.skipped == 3
    assert got.errors_by_kind == {"UNAVAILABLE": 1}
    assert got.error_examples == ["UNAVAILABLE: after the kill"]
    assert got.per_precision["fp32"]["ok"] == 1 and got.per_precision["fp32"]["sent"] == 2
    assert got.per_precision["fp16"]["throughput"] == pytest.approx(0.1)
    without_kill = summarize_valid(calls, duration_s=10.0)
    assert without_kill.errors == 2 and without_kill.killed_window_errors == 0


def _samples(rss_mb: list[float], fds: list[int]) -> list[ProcSample]:
    return [
        ProcSample(float(t), int(r * MB), f)
        for t, (r, f) in enumerate(zip(rss_mb, fds, strict=True))
    ]


def test_growth_compares_first_and_last_windows_after_the_warm_up() -> None:
    # 0-19 s warm-up climbing to 200 MB (ignored); then 100 MB for 30 s; last 10 s at 104 MB.
    rss = [200.0] * 20 + [100.0] * 30 + [104.0] * 11
    fds = [40] * 20 + [30] * 30 + [31] * 11
    got = growth(_samples(rss, fds), warmup_end=20.0, end=60.0)
    assert got is not None
    assert (got.rss_first_mb, got.rss_last_mb) == (100.0, 104.0)
    assert got.rss_growth_pct == pytest.approx(4.0)
    assert (got.fds_first, got.fds_last, got.fds_growth) == (30.0, 31.0, 1.0)
    assert growth(_samples([100.0], [30]), warmup_end=0.0, end=10.0) is None


def _probe(max_ms: float, errors: int = 0) -> dict:
    return {"probe": "/v2/health/ready", "big": "http 60 MB json", "count": 5,
            "errors": errors, "max_ms": max_ms}  # fmt: skip


def _big(delta: float, answered: int = 50) -> dict:
    return {"asked": 50, "answered": answered, "rss_delta_mb": delta}


def _checks(**change: object) -> list:
    args: dict = {
        "valid": summarize_valid([Call(0, 0.01, "fp32")], 1.0),
        "grown": growth(_samples([100.0] * 30, [30] * 30), 0.0, 30.0),
        "in_flight": [_probe(20.0)],
        "big": _big(50.0),
    }
    args.update(change)
    return checks(args["valid"], args["grown"], args["in_flight"], args["big"])


def test_every_check_passes_on_a_healthy_run() -> None:
    got = _checks()
    assert [c.passed for c in got] == [True] * 5
    assert passed(got)


@pytest.mark.parametrize(
    ("change", "failing"),
    [
        ({"in_flight": [_probe(150.0)]}, "in flight"),
        ({"in_flight": [_probe(20.0, errors=1)]}, "in flight"),
        ({"big": _big(250.0)}, "rejected 60 MB"),
        ({"big": _big(10.0, answered=49)}, "rejected 60 MB"),
        ({"grown": growth(_samples([100.0] * 15 + [106.0] * 15, [30] * 30), 0, 30)}, "RSS"),
        ({"grown": growth(_samples([100.0] * 30, [30] * 15 + [50] * 15), 0, 30)}, "fds"),
        ({"valid": summarize_valid([Call(0, 1, "fp32", "INTERNAL: x")], 1.0)}, "lost"),
        ({"valid": summarize_valid([Call(0, 1, "fp32")], 1.0, skipped=1)}, "lost"),
        ({"grown": None}, "RSS"),
    ],
)
def test_a_check_fails_when_its_figure_is_over_the_limit(change: dict, failing: str) -> None:
    got = _checks(**change)
    bad = [c.name for c in got if not c.passed]
    assert len(bad) == 1 and failing in bad[0], bad
    assert not passed(got)


def test_the_report_is_plain_json() -> None:
    report = {"valid": summarize_valid(_calls(), 30.0), "checks": _checks(), "x": float("nan")}
    text = json.dumps(to_jsonable(report))
    assert json.loads(text)["valid"]["sent"] == 110 and '"x": null' in text


def test_cli_rejects_a_bad_option_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert soak.main(["--minutes", "0", "--out", "unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "python -m lab.soak.driver: error: --minutes must be > 0, got 0.0"
