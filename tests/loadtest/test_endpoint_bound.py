"""The load-test report says when the endpoint, not the precision, bounds throughput, from the
gateway's own histograms (engine time per run, rows per run), and then does not rank the
precisions by throughput."""

from __future__ import annotations

import pytest

from loadtest.report import RunInfo, VariantInfo, endpoint_bound, engine_shares, recommendations
from loadtest.runner import StepResult


def _step(precision: str, users: int, throughput: float, engine_ms: float) -> StepResult:
    lat = {"p50": 2.0, "p90": 2.5, "p95": 3.0, "p99": 4.0, "max": 5.0, "mean": 2.0}
    server = {"upstream_mean_ms": engine_ms, "batch_mean": 1.0, "requests": 100}
    return StepResult(precision, users, 1, 100, 0, 1.0, throughput, throughput, lat, server=server)


def _info() -> RunInfo:
    variants = {
        "fp32": VariantInfo(accuracy_loss=0.0),
        "int8": VariantInfo(accuracy_loss=0.1),
    }
    return RunInfo("digits", "t", {}, "cmd", 5, 1, 1.0, variants)


def _engine_bound() -> list[StepResult]:
    """4 ms per row at ~240 rows/s (fp32, busy ~96 %); int8 twice as fast: a clear lead."""
    return [
        _step("fp32", 1, 200, 4.0),
        _step("fp32", 4, 240, 4.0),
        _step("int8", 1, 400, 2.0),
        _step("int8", 4, 480, 2.0),
    ]


def test_engine_share_is_busy_time_per_second_at_peak() -> None:
    results = [_step("fp32", 1, 300, 0.3), _step("fp32", 4, 400, 0.5)]
    share = engine_shares(results)["fp32"]
    # peak: 400 rows/s in runs of 1 row taking 0.5 ms -> busy 0.2 s of every second
    assert share.busy == pytest.approx(0.2)
    # lightest: 0.3 ms of engine in a 2.0 ms mean round trip
    assert share.round_trip == pytest.approx(0.15)


def test_endpoint_bound_run_names_it_and_ranks_by_engine_time() -> None:
    # int8's engine is 2x faster, yet fp32 shows the higher throughput: the endpoint decides.
    results = [
        _step("fp32", 1, 300, 0.4),
        _step("fp32", 4, 360, 0.4),
        _step("int8", 1, 310, 0.2),
        _step("int8", 4, 330, 0.2),
    ]
    line = endpoint_bound(results)
    assert line is not None and "the endpoint, not the precision, bounds throughput" in line
    assert "fp32 14%" in line and "int8 7%" in line
    lines = recommendations(results, _info())
    assert lines[0] == line
    top = next(x for x in lines if x.startswith("highest throughput"))
    assert "**fp32**" in top and "endpoint-bound, not evidence" in top
    best = next(x for x in lines if x.startswith("best within the accuracy budget"))
    assert "**int8** by engine time" in best


def test_engine_bound_run_ranks_by_throughput() -> None:
    results = _engine_bound()
    assert endpoint_bound(results) is None
    lines = recommendations(results, _info())
    assert not any("endpoint" in x for x in lines)
    best = next(x for x in lines if x.startswith("best within the accuracy budget"))
    assert "**int8** (480 inferences/s" in best


def test_without_server_view_nothing_is_claimed() -> None:
    lat = {"p50": 2.0, "p90": 2.5, "p95": 3.0, "p99": 4.0, "max": 5.0, "mean": 2.0}
    results = [StepResult("fp32", 1, 1, 100, 0, 1.0, 300.0, 300.0, lat)]
    assert engine_shares(results) == {}
    assert endpoint_bound(results) is None


def test_a_variant_kept_over_its_build_budget_is_never_recommended() -> None:
    results = _engine_bound()
    info = _info()
    info.variants["int8"].budget_met = False  # built with --keep-over-budget
    best = next(x for x in recommendations(results, info) if x.startswith("best within"))
    assert "**fp32**" in best


def test_throughputs_within_the_tie_margin_are_not_ranked_by_throughput() -> None:
    # The digits demo of 2026-12-02: fp32 555/s, int8 545/s at peak (engine ~50% busy, so not
    # endpoint-bound by the rule); the 2 % between them is no evidence for fp32.
    results = [
        _step("fp32", 1, 344, 0.93),
        _step("fp32", 4, 555, 0.92),
        _step("int8", 1, 362, 0.82),
        _step("int8", 4, 545, 0.92),
    ]
    results[2].latency_ms["p50"] = 1.5  # int8 answers faster at the lightest load
    assert endpoint_bound(results) is None
    lines = recommendations(results, _info())
    top = next(x for x in lines if x.startswith("highest throughput"))
    assert "**fp32**" in top and "a tie with int8 545/s" in top
    best = next(x for x in lines if x.startswith("best within the accuracy budget"))
    assert "**int8**" in best and "tied on throughput with fp32 555/s" in best


def test_a_clear_throughput_lead_is_no_tie() -> None:
    results = _engine_bound()
    lines = recommendations(results, _info())
    assert not any("tie" in x for x in lines)
