"""Envoy's per-variant stats on the gateway's ``/metrics``, read at scrape time.

Through the Envoy front the control plane never sees inference for Triton-served variants, so
its own request series stay still; this collector reads each variant cluster's stats from
Envoy's admin endpoint (loopback, ``/stats/prometheus``) when Prometheus scrapes and exports
them under the project's names (docs/metrics.md):

- ``precision_serve_envoy_upstream_requests_total{model, precision, protocol}``: attempts sent
  to Triton (``cluster.<variant>.upstream_rq_total``; ``protocol`` grpc or http);
- ``precision_serve_envoy_upstream_retries_total{...}``: of those, the retries (a fallback to
  the next precision, or another replica);
- ``precision_serve_envoy_upstream_active_requests{...}``: attempts in flight to Triton now
  (``upstream_rq_active``; with the gateway's own in-flight gauge, what its HPA scales on);
- ``precision_serve_envoy_responses_total{model, precision, protocol, code}``: replies by
  ``code``, ``ok`` or the gRPC status code name as in ``precision_serve_requests_total``'s
  ``status`` (gRPC: the grpc_stats filter's per-status counters on the routed variant's
  cluster; HTTP: the cluster's per-attempt HTTP codes, mapped as the gateway maps its errors);
- ``precision_serve_envoy_upstream_duration_seconds{model, precision, protocol}``: Envoy's
  ``upstream_rq_time`` histogram per attempt (Envoy counts milliseconds; the front configures
  the project's latency buckets, server/front/config.py ``stats_config``);
- ``precision_serve_envoy_routed_requests_total{model, precision, protocol, policy}``: requests
  to a logical model by the precision Envoy routed them to first and why: the model's policy
  name, or ``request`` when the client asked for the precision (parameter or header); from
  the model routes' own stats (``vhost.gateway.route.ps:...``, config.py ``Kind.stat_prefix``:
  Envoy counts a route's attempts; less its retries, each request once).

The label ``code`` (not ``status``) and the extra ``protocol`` on the histogram keep these series
apart from the gateway's own, so dashboards can ``or`` the two without a label clash.
Envoy unreachable (restarting): the families are left out of that scrape.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import grpc
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from server.front.config import HTTP, ROUTE_STATS, route_of
from server.front.supervisor import EnvoyError, EnvoyFront
from server.transports.http.app import HTTP_STATUS

_STATS = r"^cluster\.[^.]+\.(upstream_rq_(total|retry|time|active|\d\d\d)|grpc\..*ModelInfer\.\d+)$"
_GRPC_CODE = re.compile(r"^envoy_cluster_grpc_ModelInfer_(\d+)$")
_GRPC_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}
_GRPC_NAMES[0] = "ok"
# HTTP code -> the gRPC name the gateway would count (first name per code wins)
_HTTP_NAMES: dict[int, str] = {}
for _name, _code in HTTP_STATUS.items():
    _HTTP_NAMES.setdefault(_code, _name)
_HTTP_NAMES[429] = "RESOURCE_EXHAUSTED"


def http_code_name(code: int) -> str:
    """An HTTP reply's code as the gateway's ``status`` label names it."""
    if 200 <= code < 300:
        return "ok"
    return _HTTP_NAMES.get(code, "UNKNOWN")


def grpc_code_name(code: int) -> str:
    return _GRPC_NAMES.get(code, "UNKNOWN")


class EnvoyCollector(Collector):
    def __init__(
        self,
        front: EnvoyFront,
        variants: dict[str, tuple[str, str]],
        policies: dict[str, str] | None = None,
    ) -> None:
        """``variants``: Triton-served variant name -> (model, precision); ``policies``:
        logical model -> its policy's name."""
        self.front = front
        self.policies = dict(policies or {})
        self.clusters: dict[str, tuple[str, str, str]] = {}
        for name, (model, precision) in variants.items():
            self.clusters[name] = (model, precision, "grpc")
            self.clusters[HTTP.name(name)] = (model, precision, "http")

    def describe(self) -> list[Metric]:
        """Nothing up front: registering never calls Envoy, and two in-process gateways (tests)
        may each register one."""
        return []

    def collect(self) -> Iterator[Metric]:
        try:
            text = self.front.prometheus_stats(_STATS)
            routes = self.front.stats(ROUTE_STATS)
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
        active = GaugeMetricFamily(
            "precision_serve_envoy_upstream_active_requests",
            "Attempts Envoy has in flight to Triton now, per variant cluster.",
            labels=labels,
        )
        responses = CounterMetricFamily(
            "precision_serve_envoy_responses",
            "Replies through the Envoy front by code (ok or the gRPC status code name).",
            labels=[*labels, "code"],
        )
        duration = HistogramMetricFamily(
            "precision_serve_envoy_upstream_duration_seconds",
            "Seconds from Envoy's first byte to Triton until Triton's reply, per attempt.",
            labels=labels,
        )
        counts: dict[tuple[str, str, str, str], float] = {}
        buckets: dict[tuple[str, str, str], list[tuple[str, float]]] = {}
        sums: dict[tuple[str, str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                values = self.clusters.get(sample.labels.get("envoy_cluster_name", ""))
                if values is None:
                    continue
                # the parser names counter samples <family>_total: match on the family's name
                name = family.name if family.type == "counter" else sample.name
                value = sample.value
                if name == "envoy_cluster_upstream_rq" and "envoy_response_code" in sample.labels:
                    if values[2] == "http":
                        code = http_code_name(int(sample.labels["envoy_response_code"]))
                        counts[(*values, code)] = counts.get((*values, code), 0.0) + value
                elif name == "envoy_cluster_upstream_rq":
                    requests.add_metric(list(values), value)
                elif name == "envoy_cluster_upstream_rq_active":
                    active.add_metric(list(values), value)
                elif name == "envoy_cluster_upstream_rq_retry":
                    retries.add_metric(list(values), value)
                elif (match := _GRPC_CODE.match(name)) and values[2] == "grpc":
                    code = grpc_code_name(int(match.group(1)))
                    counts[(*values, code)] = counts.get((*values, code), 0.0) + value
                elif name == "envoy_cluster_upstream_rq_time_bucket":
                    le = sample.labels["le"]
                    bound = floatToGoString(float(le) / 1000)
                    buckets.setdefault(values, []).append((bound, value))
                elif name == "envoy_cluster_upstream_rq_time_sum":
                    sums[values] = value / 1000  # milliseconds -> seconds
        for key, value in counts.items():
            responses.add_metric(list(key), value)
        for values, cumulative in buckets.items():
            duration.add_metric(list(values), cumulative, sums.get(values, 0.0))
        yield self._routed(routes)
        yield requests
        yield retries
        yield active
        yield responses
        yield duration

    def _routed(self, routes: dict[str, int]) -> Metric:
        """The model routes' requests (their attempts less their retries, ``route_of``) by model,
        precision, protocol and policy."""
        routed = CounterMetricFamily(
            "precision_serve_envoy_routed_requests",
            "Requests to a logical model by the precision Envoy routed them to first, and why "
            "(the policy's name, or request when the client asked).",
            labels=["model", "precision", "protocol", "policy"],
        )
        requests: dict[tuple[str, str, str, str], float] = {}
        for stat, value in routes.items():
            if (route := route_of(stat)) is not None:
                protocol, model, precision, by_policy, counter = route
                policy = self.policies.get(model, "policy") if by_policy else "request"
                key = (model, precision, protocol, policy)
                # attempts - retries: each request's first attempt
                requests[key] = requests.get(key, 0.0) + (value if counter == "total" else -value)
        for key, value in requests.items():
            routed.add_metric(list(key), value)
        return routed
