"""A discrete-event model of one serving queue on a virtual clock, driving the real
:class:`server.routing.slo.SloController` (tests/server/test_slo_simulation.py).

One server takes requests in arrival order; a request's service time depends on the precision
the controller picked for it (with some jitter); arrivals are Poisson at a rate that follows a
piecewise-linear schedule. Nothing here reads the wall clock, so the outcome depends only on the
seed.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from server.routing.slo import Rung, SloController
from server.routing.slo_config import SloSettings


class VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def ramp(points: Sequence[tuple[float, float]]) -> Callable[[float], float]:
    """Arrival rate (req/s) at time t, linear between ``(t, rate)`` points."""

    def rate(t: float) -> float:
        for (t0, r0), (t1, r1) in itertools.pairwise(points):
            if t0 <= t < t1:
                return r0 + (r1 - r0) * (t - t0) / (t1 - t0)
        return points[-1][1]

    return rate


@dataclass
class Bin:
    start: float
    latencies: list[float] = field(default_factory=list)
    served: dict[str, int] = field(default_factory=dict)
    level: float = 0.0  # the controller's level when the bin closed
    loss: float = 0.0  # its expected loss then

    def p99(self) -> float:
        xs = sorted(self.latencies)
        return xs[max(0, math.ceil(0.99 * len(xs)) - 1)] if xs else 0.0


@dataclass
class Result:
    bins: list[Bin]
    actions: list[tuple[float, str, float]]  # (time, action, level after it) per window
    max_loss: float


def simulate(
    rungs: Sequence[Rung],
    service_s: dict[str, float],
    settings: SloSettings,
    rate: Callable[[float], float],
    duration_s: float,
    budget: float = 1.0,
    bin_s: float = 5.0,
    seed: int = 1,
) -> Result:
    rng = random.Random(seed)
    clock = VirtualClock()
    c = SloController(rungs, settings, budget, clock)
    bins = [Bin(i * bin_s) for i in range(math.ceil(duration_s / bin_s))]
    actions: list[tuple[float, str, float]] = []
    events: list[tuple[float, int, str, float]] = []  # (time, seq, kind, arrival time)
    seq = 0
    free_at = 0.0
    max_loss = 0.0

    def next_arrival(t: float) -> float:
        # thinning against the schedule's peak keeps the Poisson process exact
        peak = max(rate(x) for x in (t, t + 1.0)) * 1.5 + 1e-9
        while True:
            t += rng.expovariate(peak)
            if rng.random() < rate(t) / peak:
                return t

    heapq.heappush(events, (next_arrival(0.0), seq, "arrive", 0.0))
    while events:
        t, _, kind, arrived = heapq.heappop(events)
        clock.now = t
        if kind == "arrive":
            if t >= duration_s:
                continue
            c.started()
            precision = c.pick(rng.random())
            service = service_s[precision] * rng.uniform(0.7, 1.3)
            free_at = max(free_at, t) + service
            seq += 1
            heapq.heappush(events, (free_at, seq, precision, t))
            seq += 1
            heapq.heappush(events, (next_arrival(t), seq, "arrive", 0.0))
            continue
        window = c.observe(t - arrived)
        b = bins[min(int(arrived // bin_s), len(bins) - 1)]
        b.latencies.append(t - arrived)
        b.served[kind] = b.served.get(kind, 0) + 1
        b.level, b.loss = c.level, c.expected_loss()
        max_loss = max(max_loss, c.expected_loss())
        if window is not None:
            actions.append((t, window.action, c.level))
    return Result(bins, actions, max_loss)
