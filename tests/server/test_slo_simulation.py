"""The real SloController driving a simulated queue on a virtual clock (tests/server/slo_sim.py):
a load ramp past the accurate variant's capacity and back, and steady loads. Deterministic
(seeded); no wall clock, no servers."""

from __future__ import annotations

import itertools

import pytest

from server.routing.slo import Rung
from server.routing.slo_config import SloSettings
from tests.server.slo_sim import Result, ramp, simulate

# fp32 serves 100 req/s, int8 ~143 (the 1.4x of minilm's int8-dynamic on an AVX2 host)
RUNGS = [Rung("fp32", 0.0, 10.0), Rung("int8", 0.8, 7.0)]
SERVICE = {"fp32": 0.010, "int8": 0.007}
OBJECTIVE = 0.120  # 12 x fp32's service time (Poisson arrivals are burstier than paced users)
# half of fp32's capacity -> 1.15 x it (0.8 of int8's) -> back, like lab.slo_ramp's ramp
RAMP = ramp([(0, 50), (30, 50), (90, 115), (180, 115), (240, 50), (300, 50)])
DURATION = 300.0


def first_up(result: Result) -> float | None:
    return next((t for t, action, _ in result.actions if action == "up"), None)


def within(result: Result, after: float) -> float:
    bins = [b for b in result.bins if b.start >= after and b.latencies]
    return sum(b.p99() <= OBJECTIVE for b in bins) / len(bins)


def reversals(result: Result, after: float) -> int:
    moves = [a for t, a, _ in result.actions if t >= after and a != "hold"]
    return sum(1 for a, b in itertools.pairwise(moves) if a != b)


@pytest.fixture(scope="module", params=[1, 2, 3])
def ramped(request) -> Result:
    return simulate(
        RUNGS, SERVICE, SloSettings(p99_s=OBJECTIVE), RAMP, DURATION, seed=request.param
    )


def test_fixed_fp32_cannot_hold_the_objective_on_the_ramp():
    fixed = simulate(RUNGS[:1], SERVICE, SloSettings(p99_s=OBJECTIVE), RAMP, DURATION)
    assert within(fixed, after=60.0) < 0.5  # the scenario is one that needs adapting


def test_slo_shifts_within_a_few_windows_of_the_overload(ramped):
    shifted = first_up(ramped)
    # the rate passes fp32's 100 req/s at t = 76 s; a window is ~2 s at these rates
    assert shifted is not None and shifted < 76.0 + 3 * 2.5, ramped.actions[:40]
    # and follows the rise: (nearly) all int8 within a few windows of the peak's start (90 s)
    assert max(lv for t, _, lv in ramped.actions if t <= 90.0 + 5 * 2.5) >= 0.9


def test_slo_holds_the_objective_after_its_first_shift():
    """Over five seeded ramps: the median run is within the objective in >= 90 % of bins after
    its first shift, and none below 80 % (one run's Poisson bursts move it by a few bins)."""
    shares = []
    for seed in range(1, 6):
        result = simulate(RUNGS, SERVICE, SloSettings(p99_s=OBJECTIVE), RAMP, DURATION, seed=seed)
        shifted = first_up(result)
        assert shifted is not None, seed
        shares.append(within(result, after=shifted + 5.0))
    assert sorted(shares)[2] >= 0.9 and min(shares) >= 0.8, shares


def test_slo_comes_back_as_load_falls_and_keeps_the_budget(ramped):
    peak = [b for b in ramped.bins if 120 <= b.start < 180]
    low_again = [b for b in ramped.bins if b.start >= 280]
    assert min(b.level for b in peak) >= 0.8  # mostly int8 at the peak
    assert all(b.level == 0.0 for b in low_again)  # all fp32 again once the load is low
    assert ramped.max_loss <= 1.0 + 1e-9


@pytest.mark.parametrize("rate", [50.0, 80.0, 95.0, 115.0])
def test_no_flapping_at_steady_load(rate):
    result = simulate(
        RUNGS, SERVICE, SloSettings(p99_s=OBJECTIVE), ramp([(0, rate), (1, rate)]), 600.0
    )
    # after settling, 240 windows: a load between two levels makes the controller probe back
    # now and then (the window p99 of Poisson arrivals is noisy), but the back-off and the
    # feed-forward's floor keep it to at most one reversal per ~24 windows (the same controller
    # with up_windows = down_windows = 1 reverses 18-31 times here)
    assert reversals(result, after=120.0) <= 10, [a for a in result.actions if a[1] != "hold"]
    settled = [b for b in result.bins if b.start >= 120.0]
    assert sum(b.p99() <= OBJECTIVE for b in settled) / len(settled) >= 0.85
    assert result.max_loss <= 1.0 + 1e-9
    if rate == 50.0:
        assert all(b.level == 0.0 for b in settled)  # no reason to leave fp32
