"""Envoy's per-variant counters on the gateway's ``/metrics``, read at scrape time.

Through the Envoy front the control plane never sees inference for Triton-served variants, so
its own request counters stay still; this collector reads each variant cluster's counters from
Envoy's admin endpoint (loopback) when Prometheus scrapes and exports them under the project's
names (docs/metrics.md):

- ``precision_serve_envoy_upstream_requests_total{model, precision, protocol}``: attempts sent
  to Triton (``cluster.<variant>.upstream_rq_total``; ``protocol`` grpc or http);
- ``precision_serve_envoy_upstream_retries_total{...}``: of those, the retries (a fallback to
  the next precision, or another replica).

Envoy unreachable (restarting): the families are left out of that scrape.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from server.front.config import HTTP
from server.front.supervisor import EnvoyError, EnvoyFront

_STATS = r"^cluster\..*\.upstream_rq_(total|retry)$"


class EnvoyCollector(Collector):
    def __init__(self, front: EnvoyFront, variants: dict[str, tuple[str, str]]) -> None:
        """``variants``: Triton-served variant name -> (model, precision)."""
        self.front = front
        self.clusters: dict[str, tuple[str, str, str]] = {}
        for name, (model, precision) in variants.items():
            self.clusters[name] = (model, precision, "grpc")
            self.clusters[HTTP.name(name)] = (model, precision, "http")

    def describe(self) -> list[CounterMetricFamily]:
        """Nothing up front: registering never calls Envoy, and two in-process gateways (tests)
        may each register one."""
        return []

    def collect(self) -> Iterator[CounterMetricFamily]:
        try:
            stats = self.front.stats(_STATS)
        except (OSError, ValueError, EnvoyError):
            return
        labels = ["model", "precision", "protocol"]
        requests = CounterMetricFamily(
            "precision_serve_envoy_upstream_requests",
            "Attempts Envoy sent to Triton, per variant cluster (the Envoy front).",
            labels=labels,
        )
        retries = CounterMetricFamily(
            "precision_serve_envoy_upstream_retries",
            "Of those, retries: the next precision of a chain, or another replica.",
            labels=labels,
        )
        for cluster, values in self.clusters.items():
            total = stats.get(f"cluster.{cluster}.upstream_rq_total")
            if total is None:
                continue
            requests.add_metric(list(values), total)
            retries.add_metric(list(values), stats.get(f"cluster.{cluster}.upstream_rq_retry", 0))
        yield requests
        yield retries
