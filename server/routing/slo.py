"""The ``slo`` routing policy: meet a p99 latency objective by shifting traffic to faster
variants as load rises, within an accuracy budget, and back as load falls.

The **ladder** is the model's variants from most to least accurate (manifest
``details.accuracy_loss``), keeping only those at least ``min_speedup`` x faster (manifest or
re-timed speed) than the rung before.
The **level** says where traffic sits on it: level 1.3 sends 70 % to rung 1 and 30 % to rung 2.
Its ceiling is where the traffic-weighted loss of the mix reaches the budget, so a rung over the
budget may still take a partial share and the mix's expected loss never exceeds it.

The controller learns only from what the gateway measures: each request the policy routed
reports its gateway time (queue wait + engine run, ``Router.feedback``) when it ends, and the
policy counts its own in-flight requests and arrivals. Completions close **windows** (after
``window_requests`` completions, or at the first completion ``window_s`` after the window
opened - no timer runs); each window estimates p99 as the larger of the window's observed p99
and in-flight / throughput (Little's law: what a request arriving now waits, which rises before
the observed latencies do), and measures the arrival rate. Through the Envoy front, where the
gateway sees none of these requests, the windows come from Envoy's per-cluster stats instead
(server/front/slo.py) and go to the same decision (:meth:`SloController.close_window`).

Shifting to faster rungs reacts in proportion to the overload: ``up_windows`` consecutive
windows above ``shift_up_above`` x objective, or a single one above ``fast_shift_above``, move
``step`` x (estimate / (``shift_up_above`` x objective))^2 (at most a whole rung per window).
The **feed-forward** term (``feed_forward``) learns the rate at which the objective fails: a
window that shifts up records the arrival rate (smoothed over about two windows) divided by the
mix's speed-up over the first rung (rung speeds, as the ladder has them) as the ``limit``; a
window under the hot threshold raises it to what the current mix carried. The shift then goes
at least to the level whose estimated capacity (limit x speed-up) covers the arrival rate x
``headroom``, so on a rising load one shift lands where the rate needs, not a step at a time.

Shifting back stays cautious: ``down_windows`` consecutive windows below ``shift_down_below`` x
objective move one step back (two below half of that), but never below the level that the
streak's highest arrival rate needs by the limit (a shift back that this blocks raises the limit
by 5 % instead, so the evidence of one transient overload fades); anything between holds. A
shift back that has to be undone soon after (within 2 x (up_windows + down_windows) windows)
doubles the cool windows the next shift back needs (up to 16 x down_windows); a shift back that
holds halves them again. A load that sits between two levels therefore spends ever fewer windows
on the hot one instead of flapping, while a real fall in load is followed.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from server import metrics
from server.catalog import PRECISION_ORDER, Model, Variant
from server.errors import ConfigError
from server.routing.evidence import quality_is_evidence
from server.routing.policies import (
    DEFAULT_BUDGET_POINTS,
    Decision,
    ModelRoute,
    PolicyBase,
    RouteContext,
    key_fraction,
)
from server.routing.slo_config import SloSettings

log = logging.getLogger(__name__)

MAX_BACKOFF = 16  # the cool windows a shift back needs grow to at most this x down_windows
MAX_UP_MOVE = 1.0  # levels: the proportional term moves at most a whole rung per window
DEFAULT_MIN_SPEEDUP = 1.15
LIMIT_AGING = 1.05  # a shift back the limit blocked raises it this much
RATE_SMOOTHING = 0.5  # weight of the newest window in the arrival rate


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
    rate: float = 0.0  # arrivals/s the decision used (smoothed over about two windows)
    limit: float | None = None  # learned: first-rung-equivalent rate at which the objective fails


def _speed_ms(variant: Variant) -> float | None:
    """The variant's latency from its ``record.speed``: the manifest's, or where this host
    differs from the build host the figures re-timed here at start-up (server/routing/retime.py
    replaces ``record.speed`` before the router, and so this policy, is built)."""
    speed = variant.record.speed
    if speed.get("latency_ms_p50"):
        return float(speed["latency_ms_p50"])
    if speed.get("throughput"):
        return 1000.0 / float(speed["throughput"])
    return None


def ladder(model: Model, min_speedup: float = DEFAULT_MIN_SPEEDUP) -> list[Rung]:
    """Most accurate first; a less accurate rung is kept only when it is at least
    ``min_speedup`` x faster than the rung before (a marginal rung, e.g. fp16 on CPU, is within
    the noise of the speed figures and only costs windows on the way up)."""
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
        if rung.latency_ms is not None and (
            last is None or last >= min_speedup * rung.latency_ms * (1 - 1e-9)
        ):
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
        self.limit: float | None = None  # see the module doc: the feed-forward's evidence
        self._hot = self._cool = 0
        self._last_down: int | None = None  # window number of the last shift back
        self._latencies: list[float] = []
        self._arrivals = 0
        self._cool_rate = 0.0
        self._rate: float | None = None
        self._opened = clock()
        speeds = [r.latency_ms for r in self.rungs]
        self._speeds: list[float] | None = (
            [float(v) for v in speeds if v is not None]
            if settings.feed_forward and all(v is not None and v > 0 for v in speeds)
            else None
        )

    # ---- the mix ----------------------------------------------------------------------------
    def _split(self, level: float | None = None) -> tuple[int, float]:
        """(rung, share of the next rung) for ``level`` (default: the current one)."""
        level = self.level if level is None else level
        i = min(math.floor(level), len(self.rungs) - 1)
        return i, level - i

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

    def speedup(self, level: float | None = None) -> float | None:
        """The mix's estimated capacity over the first rung's (rung speeds); None: unknown."""
        if self._speeds is None:
            return None
        i, f = self._split(level)
        mix = (1 - f) * self._speeds[i] + (f * self._speeds[i + 1] if f > 0 else 0.0)
        return self._speeds[0] / mix

    def needed_level(self, rate: float) -> float:
        """The lowest level whose estimated capacity (limit x speed-up) covers ``rate`` x
        headroom (0 with no limit learned yet; at most the budget's ceiling)."""
        if self._speeds is None or self.limit is None or rate <= 0:
            return 0.0
        mix = self._speeds[0] * self.limit / (rate * self.settings.headroom)
        if mix >= self._speeds[0]:
            return 0.0
        for i in range(len(self._speeds) - 1):
            here, there = self._speeds[i], self._speeds[i + 1]
            if there <= mix:
                return min(self.max_level, i + (here - mix) / (here - there))
        return self.max_level

    # ---- feedback ---------------------------------------------------------------------------
    def started(self) -> None:
        if self.windows == 0 and self._arrivals == 0 and not self._latencies:
            # the first window opens with the first request: time before it (start-up, idle)
            # would deflate the window's arrival rate and inflate its Little estimate
            self._opened = self.clock()
        self.inflight += 1
        self._arrivals += 1

    def observe(self, seconds: float, counts: bool = True) -> Window | None:
        """A routed request ended after ``seconds``; the closed window when this closed one."""
        self.inflight = max(0, self.inflight - 1)
        if counts:
            self._latencies.append(seconds)
        now = self.clock()
        n = len(self._latencies)
        if not self.window_due(n, now - self._opened):
            return None
        self._latencies.sort()
        p99 = self._latencies[max(0, math.ceil(0.99 * n) - 1)]
        arrivals, elapsed = self._arrivals, now - self._opened
        self._latencies = []
        self._arrivals = 0
        self._opened = now
        return self.close_window(n, p99, self.inflight, elapsed, arrivals)

    def window_due(self, completions: int, elapsed_s: float) -> bool:
        """Whether a window with ``completions`` counted, open for ``elapsed_s``, closes now:
        after ``window_requests`` completions, or at the first one ``window_s`` after it opened."""
        s = self.settings
        return completions > 0 and (completions >= s.window_requests or elapsed_s >= s.window_s)

    def close_window(
        self, requests: int, p99_s: float, inflight: int, elapsed_s: float, arrivals: int
    ) -> Window:
        """Decide on one closed window: ``requests`` completions whose p99 was ``p99_s``,
        ``inflight`` requests still running at its end, ``arrivals`` in its ``elapsed_s``. Fed by
        :meth:`observe` (per request) or by the Envoy front's stats (server/front/slo.py)."""
        elapsed = max(elapsed_s, 1e-9)
        estimate = max(p99_s, inflight * elapsed / max(requests, 1))  # Little: in flight / thpt
        self.windows += 1
        action = self._decide(estimate / self.settings.p99_s, arrivals / elapsed)
        smoothed = self._rate or 0.0
        self.last = Window(
            requests, p99_s, estimate, inflight, action, self.level, smoothed, self.limit
        )
        return self.last

    def _decide(self, ratio: float, rate: float) -> str:
        s = self.settings
        hot, cool = ratio > s.shift_up_above, ratio < s.shift_down_below
        if hot:
            self._hot, self._cool = self._hot + 1, 0
        elif cool:
            self._hot, self._cool = 0, self._cool + 1
        else:
            self._hot = self._cool = 0
        # the arrival rate, smoothed over about two windows (one window's count is noisy)
        self._rate = (
            rate
            if self._rate is None
            else RATE_SMOOTHING * rate + (1 - RATE_SMOOTHING) * self._rate
        )
        rate = self._rate
        # the highest arrival rate of the current cool streak: what a shift back must carry
        self._cool_rate = max(self._cool_rate, rate) if self._cool > 1 else rate
        due = hot and (self._hot >= s.up_windows or ratio >= s.fast_shift_above)
        self._learn(rate, due, hot)
        if due and self.level < self.max_level:
            # in proportion to the overload, and at least what the arrival rate needs
            move = min(MAX_UP_MOVE, max(s.step, s.step * (ratio / s.shift_up_above) ** 2))
            target = max(self.level + move, self.needed_level(rate))
            return self._shift_up(min(self.max_level, round(target, 9)))
        if self._cool >= self.down_needed and self.level > 0:
            return self._shift_back(ratio, self._cool_rate)
        return "hold"

    def _learn(self, rate: float, due: bool, hot: bool) -> None:
        """The feed-forward's limit: set by a window that shifts up, raised by one within the
        objective's hot threshold (what the current mix carried)."""
        speedup = self.speedup()
        if speedup is None or rate <= 0:
            return
        carried = rate / speedup
        if due:
            self.limit = carried if self.limit is None else min(self.limit, carried)
        elif not hot and self.limit is not None:
            self.limit = max(self.limit, carried)

    def _shift_up(self, target: float) -> str:
        s = self.settings
        self.level = target
        self._hot = 0
        recent = self._last_down is not None and (
            self.windows - self._last_down <= 2 * (s.up_windows + s.down_windows)
        )
        if recent:  # the last shift back was too much: be slower to shift back next time
            self.down_needed = min(self.down_needed * 2, s.down_windows * MAX_BACKOFF)
        self._last_down = None
        return "up"

    def _shift_back(self, ratio: float, rate: float) -> str:
        """One or two steps back, but not below what ``rate`` (the cool streak's highest
        arrival rate) needs."""
        s = self.settings
        self._cool = 0
        steps = 2 if ratio < s.shift_down_below / 2 else 1
        target = max(0.0, round(self.level - steps * s.step, 9), self.needed_level(rate))
        if target >= self.level - 1e-9:  # the rate still needs this level: let evidence fade
            if self.limit is not None:
                self.limit *= LIMIT_AGING
            return "hold"
        if self._last_down is not None:  # the previous shift back held: relax the back-off
            self.down_needed = max(s.down_windows, self.down_needed // 2)
        self.level = target
        self._last_down = self.windows
        return "down"


class SloPolicy(PolicyBase):
    """Routes by an :class:`SloController`; exports the mix, the objective and its loss."""

    name = "slo"
    learns = True  # observe() feeds the controller

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
        rungs = ladder(model, route.slo.min_speedup)
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
        x = key_fraction(ctx.key) if ctx.key else ctx.rng.random()
        if self.learns:
            self.controller.started()
        return Decision(self.controller.pick(x), self.name)

    def observe(self, precision: str, seconds: float, counts: bool) -> None:
        window = self.controller.observe(seconds, counts)
        if window is not None:
            self.report(window)

    def fed_elsewhere(self) -> None:
        """The windows come from another data plane (the Envoy front's stats,
        server/front/slo.py): requests this process routes still follow the mix but no longer
        feed it (``learns`` off: the gateway stops reporting them)."""
        self.learns = False

    def report(self, window: Window) -> None:
        """A closed window: the estimate and, after a shift, the mix to Prometheus and the log."""
        metrics.SLO_ESTIMATED_P99.labels(model=self.model).set(window.estimate_s)
        if window.action != "hold":
            metrics.SLO_SHIFTS.labels(model=self.model, direction=window.action).inc()
            self._export()
            log.info(
                "slo %s: shift %s to level %.2f (%s): estimated p99 %.0f ms over %d requests, "
                "%.1f req/s arriving, limit %s",
                self.model,
                window.action,
                window.level,
                ", ".join(f"{p} {v:.0%}" for p, v in self.controller.shares().items() if v),
                1000 * window.estimate_s,
                window.requests,
                window.rate,
                "unknown" if window.limit is None else f"{window.limit:.1f} req/s",
            )

    def _export(self) -> None:
        for precision, share in self.controller.shares().items():
            metrics.SLO_SHARE.labels(model=self.model, precision=precision).set(share)
        metrics.SLO_EXPECTED_LOSS.labels(model=self.model).set(self.controller.expected_loss())
