"""The ``slo`` policy through the Envoy front: Envoy's per-cluster stats in, runtime weights out.

Through Envoy the control plane never sees the requests of an slo model, so the controller
(server/routing/slo.py, the same :class:`SloController` the Python path feeds per request) gets
its windows from Envoy's admin endpoint instead. Every :data:`POLL_S` the loop reads, for the
clusters of each slo model's rungs (gRPC and HTTP: ``tiny_fp32``, ``tiny_fp32_http``, ...),
``/stats?format=json&histogram_buckets=detailed``:

- ``upstream_rq_total`` (attempts started: the arrivals) and ``upstream_rq_completed``
  (attempts ended: the completions), counters read as deltas since the window opened;
- ``upstream_rq_active`` (attempts in flight now: the Little's-law term);
- ``upstream_rq_time``, the time per attempt, as Envoy's own detailed histogram: its
  cumulative ``totals`` bins (lower bound, width, count; milliseconds, about two significant
  digits), whose deltas since the window opened are the window's latencies.

Why the cumulative bins and not the quantiles Envoy computes: the controller needs one p99 over
the whole mix (several clusters), and quantiles of separate clusters cannot be combined, while
bin counts add up; and Envoy's ``interval`` quantiles cover its stats-flush interval, not the
controller's windows, which close on completions (``window_requests``, or the first poll
``window_ms`` after the window opened; :meth:`SloController.window_due`, as on the Python path).
The detailed bins are also much finer than the buckets exported to Prometheus (5, 10, 20, 50,
100 ms, ...). Envoy merges its workers' histograms into what ``/stats`` shows at each stats flush,
so the front flushes every :data:`server.front.config.SLO_FLUSH_S` when an slo model is routed
in Envoy, and a window's latencies lag its counters by at most that.

A window then goes to :meth:`SloController.close_window` (completions, observed p99, in flight,
arrivals and the time it was open) and to :meth:`SloPolicy.report` (the same metrics and log
lines as the Python path). After each poll the loop sets each model's runtime keys
(``ps.split.<model>.<i>``, cumulative whole percents: :func:`split_runtime`) from the
controller's shares, with a rung whose variant is unready on every replica given no first
attempts (:func:`ready_weights`, as splits follow readiness), whenever they differ from what
Envoy holds (again after Envoy restarted: its runtime starts from the bootstrap).

Differences from the Python path: Envoy's clusters count every attempt to a rung's variant,
including requests that named a precision or the variant (the Python path feeds the policy only
with the requests it routed) and fallback retries; a window with no arrivals, completions or
requests in flight is not opened (idle time counts in no window).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from server.front.config import HTTP, ModelPlan, ready_weights, split_runtime
from server.front.supervisor import EnvoyError, EnvoyFront
from server.routing.slo import SloPolicy, Window

log = logging.getLogger(__name__)

POLL_S = 0.25  # how often the loop reads Envoy's stats
QUANTILE = 0.99
_STAT = re.compile(
    r"^cluster\.(?P<cluster>.+)\.(?P<stat>upstream_rq_(total|completed|active|time))$"
)

Bins = dict[tuple[float, float], int]  # (lower bound ms, width ms) -> count


@dataclass(frozen=True)
class ClusterStats:
    """What the loop reads of one cluster (cumulative since Envoy started, but ``active``)."""

    total: int = 0  # upstream_rq_total
    completed: int = 0  # upstream_rq_completed
    active: int = 0  # upstream_rq_active
    bins: Bins = field(default_factory=dict)  # upstream_rq_time, Envoy's detailed totals


def stats_filter(clusters: Iterable[str]) -> str:
    """Envoy's ``filter`` regex for the stats :func:`parse_stats` reads of ``clusters``."""
    names = "|".join(re.escape(c) for c in sorted(clusters))
    return rf"^cluster\.({names})\.upstream_rq_(total|completed|active|time)$"


def parse_stats(document: Mapping[str, Any]) -> dict[str, ClusterStats]:
    """Envoy's ``/stats?format=json&histogram_buckets=detailed`` -> cluster -> its stats.

    Counters and gauges are ``{"name", "value"}`` entries of ``stats``; the histograms one
    entry ``{"histograms": {"supported_percentiles": [...], "details": [{"name", "totals":
    [{"lower_bound", "width", "count"}, ...], "intervals": [...], "percentiles": [...]}]}}``.
    A histogram without recorded values has empty ``totals``."""
    values: dict[str, dict[str, Any]] = {}
    for entry in document.get("stats", []):
        if "name" in entry and "value" in entry:
            match = _STAT.match(entry["name"])
            if match:
                values.setdefault(match["cluster"], {})[match["stat"]] = int(entry["value"])
            continue
        for detail in entry.get("histograms", {}).get("details", []):
            match = _STAT.match(detail.get("name", ""))
            if match and match["stat"] == "upstream_rq_time":
                bins = {
                    (float(b["lower_bound"]), float(b["width"])): int(b["count"])
                    for b in detail.get("totals", [])
                }
                values.setdefault(match["cluster"], {})["bins"] = bins
    return {
        cluster: ClusterStats(
            total=v.get("upstream_rq_total", 0),
            completed=v.get("upstream_rq_completed", 0),
            active=v.get("upstream_rq_active", 0),
            bins=v.get("bins", {}),
        )
        for cluster, v in values.items()
    }


def combine(stats: Mapping[str, ClusterStats], clusters: Iterable[str]) -> ClusterStats:
    """The sum of ``clusters``' stats (bins added bin by bin); absent clusters count 0."""
    total = completed = active = 0
    bins: Bins = {}
    for name in clusters:
        s = stats.get(name)
        if s is None:
            continue
        total, completed, active = total + s.total, completed + s.completed, active + s.active
        for key, count in s.bins.items():
            bins[key] = bins.get(key, 0) + count
    return ClusterStats(total, completed, active, bins)


def bin_delta(end: Bins, start: Bins) -> Bins:
    """The values recorded between two readings of the same cumulative bins."""
    out = {key: count - start.get(key, 0) for key, count in end.items()}
    return {key: count for key, count in out.items() if count > 0}


def quantile_s(bins: Bins, q: float = QUANTILE) -> float | None:
    """The ``q`` quantile, seconds, of the values in ``bins`` (milliseconds), by nearest rank as
    the Python path takes it, interpolated linearly within the bin (as Envoy and Prometheus do);
    None when no value is recorded."""
    n = sum(bins.values())
    if n == 0:
        return None
    rank = max(1, math.ceil(q * n))
    seen = 0
    for (lower, width), count in sorted(bins.items()):
        if seen + count >= rank:
            return (lower + width * (rank - seen) / count) / 1000.0
        seen += count
    raise AssertionError("unreachable: the rank is at most the count")


@dataclass(frozen=True)
class WindowInputs:
    """One window as the controller takes it (:meth:`SloController.close_window`)."""

    requests: int  # completions
    p99_s: float
    inflight: int
    elapsed_s: float
    arrivals: int


def window_inputs(start: ClusterStats, end: ClusterStats, elapsed_s: float) -> WindowInputs | None:
    """The window between two readings of a model's rung clusters; None while the latencies
    of its completions have not reached the histogram yet (Envoy merges at each stats flush)."""
    p99 = quantile_s(bin_delta(end.bins, start.bins))
    if p99 is None:
        return None
    return WindowInputs(
        requests=end.completed - start.completed,
        p99_s=p99,
        inflight=end.active,
        elapsed_s=elapsed_s,
        arrivals=end.total - start.total,
    )


def rung_clusters(model: ModelPlan) -> tuple[str, ...]:
    """The Envoy clusters of a model's rungs (the precisions of ``first``; a chain starts with
    its precision's own variant): each variant's gRPC and HTTP cluster."""
    variants = {model.chains[p][0] for p, _ in model.first}
    return tuple(sorted(name for v in variants for name in (v, HTTP.name(v))))


@dataclass
class ModelWindows:
    """One slo model's open window: the reading it opened at and when."""

    plan: ModelPlan
    policy: SloPolicy
    clusters: tuple[str, ...]
    start: ClusterStats | None = None
    opened: float = 0.0

    def step(self, stats: Mapping[str, ClusterStats], now: float) -> Window | None:
        """A new reading: the controller's window when it closed one."""
        end = combine(stats, self.clusters)
        start = self.start
        if (
            start is None
            or end.total < start.total  # Envoy restarted: its counters start from 0
            or end.completed < start.completed
            or (end.total == start.total and end.completed == start.completed and not end.active)
        ):  # the first reading, a restart, or idle: the window opens with traffic
            self.start, self.opened = end, now
            return None
        controller = self.policy.controller
        if not controller.window_due(end.completed - start.completed, now - self.opened):
            return None
        inputs = window_inputs(start, end, now - self.opened)
        if inputs is None:
            return None
        self.start, self.opened = end, now
        window = controller.close_window(
            inputs.requests, inputs.p99_s, inputs.inflight, inputs.elapsed_s, inputs.arrivals
        )
        self.policy.report(window)
        return window

    def runtime(self, ready: set[str]) -> dict[str, int]:
        """The runtime keys for the controller's current mix, unready rungs left out (the mix
        all on unready rungs: the most accurate ready rung; none ready: the mix as it is)."""
        shares = self.policy.controller.shares()
        first = tuple((p, shares.get(p, 0.0)) for p, _ in self.plan.first)
        weights = ready_weights(dataclasses.replace(self.plan, first=first), ready)
        if not any(share for p, share in weights.items() if p in ready):
            fallback = next((p for p, _ in first if p in ready), None)
            if fallback is not None:
                weights = {p: float(p == fallback) for p, _ in first}
        return split_runtime(self.plan.name, weights)


class EnvoySlo:
    """The control-plane loop for the slo models Envoy routes (started and stopped with the
    front by the gateway, server/app.py)."""

    def __init__(
        self,
        front: EnvoyFront,
        models: Iterable[tuple[ModelPlan, SloPolicy]],
        ready: Callable[[str], set[str]],
        poll_s: float = POLL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``ready(model)``: the precisions whose variant is ready on some replica."""
        self.front = front
        self.models = [ModelWindows(plan, policy, rung_clusters(plan)) for plan, policy in models]
        for m in self.models:
            m.policy.fed_elsewhere()  # this process's own requests no longer feed it
        self.ready = ready
        self.poll_s = poll_s
        self.clock = clock
        self.query = stats_filter(c for m in self.models for c in m.clusters)
        self._set: dict[str, dict[str, int]] = {}  # what Envoy holds, per model
        self._restarts = front.restarts
        self._task: asyncio.Task | None = None
        self._failing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.poll()
                self._failing = False
            except (OSError, ValueError, EnvoyError) as e:  # Envoy restarting: next round
                if not self._failing:
                    log.warning("slo through Envoy: cannot read or set Envoy's stats: %s", e)
                self._failing = True

    async def poll(self) -> None:
        """One round: read the stats, close the windows that are due, set the weights that
        changed."""
        document = await asyncio.to_thread(
            self.front.stats_document, self.query, histogram_buckets="detailed"
        )
        stats, now = parse_stats(document), self.clock()
        if self.front.restarts != self._restarts:  # a new Envoy holds the bootstrap's weights
            self._restarts = self.front.restarts
            self._set.clear()
        for m in self.models:
            m.step(stats, now)
            values = m.runtime(self.ready(m.plan.name))
            if values != self._set.get(m.plan.name):
                await asyncio.to_thread(self.front.set_runtime, values)
                self._set[m.plan.name] = values
                log.debug("Envoy weights of slo model %s: %s", m.plan.name, values)
