"""lab/slo_ramp.py's plan and checks on synthetic timelines (the latest run: docs/lab/slo.md)."""

from __future__ import annotations

import argparse

from lab.slo_ramp import plan_ramp, verdicts
from loadtest.timeline import Bin, Timeline


def args(**kw) -> argparse.Namespace:
    base = dict(peak=0.5, peak_users=16, hold=30, ramp=60, peak_hold=60)
    base.update(objective_ms=None, objective_x=8.0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_ramp_goes_from_half_the_reference_capacity_to_between_the_two():
    plan = plan_ramp("fp32", "int8-dynamic", {"fp32": 40.0, "int8-dynamic": 56.0}, {}, args())
    assert plan.user_rate * plan.peak_users == 48.0  # halfway from 40 to 56
    assert plan.low_users * plan.user_rate == 21.0  # round(16 x 20 / 48) = 7 users
    assert plan.schedule.users_at(0) == 7 and plan.schedule.users_at(100) == 16
    assert plan.schedule.users_at(plan.schedule.duration_s - 1) == 7
    assert plan.objective_ms == 8 * 1000 / 40
    assert plan.phases["peak"] == (90, 150)


def timeline(label: str, p99: list[float], mixes: list[dict[str, float]]) -> Timeline:
    loss = {"fp32": 0.0, "int8-dynamic": 0.8}
    bins = [
        Bin(60.0 * i, 1, 10, 0, 1.0, p, m, sum(s * loss[k] for k, s in m.items()))
        for i, (p, m) in enumerate(zip(p99, mixes, strict=True))
    ]
    return Timeline(label, 60.0, bins)


def test_checks_say_met_or_not():
    plan = plan_ramp("fp32", "int8-dynamic", {"fp32": 40.0, "int8-dynamic": 56.0}, {}, args())
    ref, half, fast = {"fp32": 1.0}, {"fp32": 0.5, "int8-dynamic": 0.5}, {"int8-dynamic": 1.0}
    fixed = timeline("fixed", [100, 300, 400, 300, 100], [ref] * 5)
    slo = timeline("slo", [100, 150, 180, 150, 100], [ref, half, fast, half, ref])
    checks = verdicts(plan, fixed, slo, 1.0, 0.8)
    assert "some bin: met" in checks[0]
    assert ">= 90%: met" in checks[1]
    assert "as load rises: met" in checks[2] and "as it falls: met" in checks[2]
    assert "budget 1: met" in checks[3]
    tight = verdicts(plan, fixed, slo, 0.5, 0.8)
    assert "budget 0.5: NOT met" in tight[3]
    flat = timeline("slo", [100, 300, 400, 300, 100], [ref] * 5)
    checks = verdicts(plan, fixed, flat, 1.0, 0.0)
    assert ">= 90%: NOT met" in checks[1] and "as load rises: NOT met" in checks[2]
