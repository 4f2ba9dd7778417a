"""The ``slo`` routing policy: meet a p99 latency objective by shifting traffic to faster
variants as load rises, within an accuracy budget, and back as load falls.

The **ladder** is the model's variants from most to least accurate (manifest
``details.accuracy_loss``), keeping only those faster (manifest speed) than the rung before.
The **level** says where traffic sits on it: level 1.3 sends 70 % to rung 1 and 30 % to rung 2.
Its ceiling is where the traffic-weighted loss of the mix reaches the budget, so a rung over the
budget may still take a partial share and the mix's expected loss never exceeds it.

The controller learns only from what the gateway measures: each request the policy routed
reports its gateway time (queue wait + engine run, ``Router.feedback``) when it ends, and the
policy counts its own in-flight requests. Completions close **windows** (after
``window_requests`` completions, or at the first completion ``window_s`` after the window
opened - no timer runs); each window estimates p99 as the larger of the window's observed p99
and in-flight / throughput (Little's law: what a request arriving now waits, which rises before
the observed latencies do). ``up_windows`` consecutive windows above ``shift_up_above`` x
objective move one ``step`` of traffic to faster rungs (two steps above 1.5 x); ``down_windows``
consecutive windows below ``shift_down_below`` x objective move one step back (two below half
of that); anything between holds. A shift back that has to be undone soon after (within
2 x (up_windows + down_windows) windows) doubles the cool windows the next shift back needs
(up to 16 x down_windows); a shift back that holds halves them again. A load that sits between
two levels therefore spends ever fewer windows on the hot one instead of flapping, while a real
fall in load is followed quickly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server import metrics
from server.errors import ConfigError
from server.evidence import quality_is_evidence
from server.repository import PRECISION_ORDER, Model, Variant
from server.routing import DEFAULT_BUDGET_POINTS, Decision, ModelRoute, RouteContext, _key_fraction
from server.slo_config import SloSettings

log = logging.getLogger(__name__)

MAX_BACKOFF = 16  # the cool windows a shift back needs grow to at most this x down_windows
FAST_SHIFT_ABOVE = 1.5  # x objective: two steps at once


@dataclass(frozen=True)
class Rung:
    precision: str
    loss: float  # manifest accuracy_loss, points (fp32 without a record: 0)
    latency_ms: float | None  # manifest speed (None: unknown)


@dataclass(frozen=True)
class Window:
    """One closed observation window and what the controller did after it."""

    requests: int
    p99_s: float
    estimate_s: float
    inflight: int
    action: str  # "up" (towards faster), "down" (towards more accurate) or "hold"
    level: float


def _speed_ms(variant: Variant) -> float | None:
    """The variant's latency from its ``record.speed``: the manifest's, or where this host
    differs from the build host the figures re-timed here at start-up (server/retime.py
    replaces ``record.speed`` before the router, and so this policy, is built)."""
    speed = variant.record.speed
    if speed.get("latency_ms_p50"):
        return float(speed["latency_ms_p50"])
    if speed.get("throughput"):
        return 1000.0 / float(speed["throughput"])
    return None


def ladder(model: Model) -> list[Rung]:
    """Most accurate first; a less accurate rung is kept only when it is faster."""
    candidates = []
    for precision, variant in model.variants.items():
        details = variant.record.details
        if details.get("budget_met") is False:
            continue
        loss = details.get("accuracy_loss")
        if loss is None and precision != "fp32":
            continue
        rank = PRECISION_ORDER.index(precision) if precision in PRECISION_ORDER else 99
        candidates.append(
            (float(loss or 0.0), rank, Rung(precision, float(loss or 0.0), _speed_ms(variant)))
        )
    rungs: list[Rung] = []
    for _, _, rung in sorted(candidates, key=lambda c: (c[0], c[1])):
        if not rungs:
            rungs.append(rung)
            continue
        last = rungs[-1].latency_ms
        if rung.latency_ms is not None and (last is None or rung.latency_ms < last):
            rungs.append(rung)
    return rungs


def ceiling(rungs: Sequence[Rung], budget: float) -> float:
    """The highest level whose mix keeps the expected loss within ``budget``."""
    for i in range(len(rungs) - 1):
        here, there = rungs[i].loss, rungs[i + 1].loss
        if there > budget:
            return i + max(0.0, (budget - here) / (there - here))
    return float(len(rungs) - 1)


class SloController:
    """The decision logic, free of wall-clock time: feed it completions, read the mix."""

    def __init__(
        self,
        rungs: Sequence[Rung],
        settings: SloSettings,
        budget: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not rungs:
            raise ValueError("an slo ladder needs at least one variant")
        if rungs[0].loss > budget:
            raise ValueError(
                f"the most accurate variant ({rungs[0].precision}, loss {rungs[0].loss:g}) is "
                f"over the accuracy budget {budget:g}"
            )
        self.rungs = list(rungs)
        self.settings = settings
        self.budget = budget
        self.clock = clock
        self.max_level = ceiling(self.rungs, budget)
        self.level = 0.0
        self.inflight = 0
        self.down_needed = settings.down_windows
        self.windows = 0  # closed so far
        self.last: Window | None = None
        self._hot = self._cool = 0
        self._last_down: int | None = None  # window number of the last shift back
        self._latencies: list[float] = []
        self._opened = clock()

    # ---- the mix ----------------------------------------------------------------------------
    def _split(self) -> tuple[int, float]:
        """(rung, share of the next rung) for the current level."""
        i = min(math.floor(self.level), len(self.rungs) - 1)
        return i, self.level - i

    def shares(self) -> dict[str, float]:
        out = {r.precision: 0.0 for r in self.rungs}
        i, f = self._split()
        out[self.rungs[i].precision] += 1.0 - f
        if f > 0:
            out[self.rungs[i + 1].precision] += f
        return out

    def expected_loss(self) -> float:
        shares = self.shares()
        return sum(shares[r.precision] * r.loss for r in self.rungs)

    def pick(self, x: float) -> str:
        """The precision for a request whose draw (or key fraction) is ``x`` in [0, 1)."""
        i, f = self._split()
        return self.rungs[i + 1].precision if x < f else self.rungs[i].precision

    # ---- feedback ---------------------------------------------------------------------------
    def started(self) -> None:
        self.inflight += 1

    def observe(self, seconds: float, counts: bool = True) -> Window | None:
        """A routed request ended after ``seconds``; the closed window when this closed one."""
        self.inflight = max(0, self.inflight - 1)
        if counts:
            self._latencies.append(seconds)
        now = self.clock()
        n = len(self._latencies)
        if n == 0 or (
            n < self.settings.window_requests and now - self._opened < self.settings.window_s
        ):
            return None
        elapsed = max(now - self._opened, 1e-9)
        self._latencies.sort()
        p99 = self._latencies[max(0, math.ceil(0.99 * n) - 1)]
        estimate = max(p99, self.inflight * elapsed / n)  # Little: in flight / throughput
        self._latencies = []
        self._opened = now
        self.windows += 1
        action = self._decide(estimate / self.settings.p99_s)
        self.last = Window(n, p99, estimate, self.inflight, action, self.level)
        return self.last

    def _decide(self, ratio: float) -> str:
        s = self.settings
        if ratio > s.shift_up_above:
            self._hot, self._cool = self._hot + 1, 0
        elif ratio < s.shift_down_below:
            self._hot, self._cool = 0, self._cool + 1
        else:
            self._hot = self._cool = 0
        if self._hot >= s.up_windows and self.level < self.max_level:
            steps = 2 if ratio > FAST_SHIFT_ABOVE else 1
            self.level = min(self.max_level, round(self.level + steps * s.step, 9))
            self._hot = 0
            recent = self._last_down is not None and (
                self.windows - self._last_down <= 2 * (s.up_windows + s.down_windows)
            )
            if recent:  # the last shift back was too much: be slower to shift back next time
                self.down_needed = min(self.down_needed * 2, s.down_windows * MAX_BACKOFF)
            self._last_down = None
            return "up"
        if self._cool >= self.down_needed and self.level > 0:
            if self._last_down is not None:  # the previous shift back held: relax the back-off
                self.down_needed = max(s.down_windows, self.down_needed // 2)
            steps = 2 if ratio < s.shift_down_below / 2 else 1
            self.level = max(0.0, round(self.level - steps * s.step, 9))
            self._cool = 0
            self._last_down = self.windows
            return "down"
        return "hold"


class SloPolicy:
    """Routes by an :class:`SloController`; exports the mix, the objective and its loss."""

    name = "slo"

    def __init__(self, model: Model, route: ModelRoute) -> None:
        if route.slo is None:
            raise ConfigError(
                f"routing for model {model.name!r}: policy slo needs slo: {{p99_ms: ...}}"
            )
        evidence, self.reason = quality_is_evidence(model, route)
        budget = route.slo.accuracy_budget
        if budget is None:
            budget = (
                route.accuracy_budget
                if route.accuracy_budget is not None
                else DEFAULT_BUDGET_POINTS
            )
        rungs = ladder(model)
        if not evidence:  # synthetic quality figures: only the reference, never shifted
            log.warning("routing: %s", self.reason)
            rungs = rungs[:1]
        try:
            self.controller = SloController(rungs, route.slo, budget)
        except ValueError as e:
            raise ConfigError(f"routing for model {model.name!r}: slo: {e}") from None
        self.model = model.name
        self.default_precision = rungs[0].precision
        metrics.SLO_OBJECTIVE.labels(model=self.model).set(route.slo.p99_s)
        metrics.SLO_BUDGET.labels(model=self.model).set(budget)
        self._export()

    def choose(self, ctx: RouteContext) -> Decision:
        x = _key_fraction(ctx.key) if ctx.key else ctx.rng.random()
        self.controller.started()
        return Decision(self.controller.pick(x), self.name)

    def observe(self, precision: str, seconds: float, counts: bool) -> None:
        window = self.controller.observe(seconds, counts)
        if window is None:
            return
        metrics.SLO_ESTIMATED_P99.labels(model=self.model).set(window.estimate_s)
        if window.action != "hold":
            metrics.SLO_SHIFTS.labels(model=self.model, direction=window.action).inc()
            self._export()

    def _export(self) -> None:
        for precision, share in self.controller.shares().items():
            metrics.SLO_SHARE.labels(model=self.model, precision=precision).set(share)
        metrics.SLO_EXPECTED_LOSS.labels(model=self.model).set(self.controller.expected_loss())
