"""Envoy's configuration for the front in front of Triton upstreams, generated as data.

:func:`plan_front` turns the repository, the router and the gateway's options into a
:class:`FrontPlan`; :func:`bootstrap` turns the plan into Envoy's bootstrap (Python dicts,
written as JSON by the supervisor, server/front/supervisor.py). No text template anywhere: the
two Lua filters are static files of this package (select.lua, rewrite.lua) whose data comes from
route metadata and per-cluster header mutations.

What the bootstrap holds:
- listener ``grpc`` (the public gRPC port): ModelInfer goes through ``select.lua``, which reads
  the head of the message and sets ``x-ps-route``; the routes then send it to a variant's
  cluster (``v:``), through a model's policy (``m:``: runtime-fraction routes, each a
  ``priority_group`` fallback chain, shadow as ``request_mirror_policies`` to the control plane,
  which compares) or, for everything else, to the control plane (the Python gateway on
  loopback);
- listener ``http`` (the public HTTP port): everything to the control plane (this pass);
- one cluster per Triton-served variant, named after it (``digits_int8``), holding the replicas
  that serve it (with precision pools: its pool's, ``FrontPlan.pools``), whose upstream
  filters rewrite ``model_name`` per attempt and add ``parameters["precision"]`` to the reply;
- clusters ``control_grpc`` / ``control_http``: the gateway behind Envoy (``--workers N``:
  every worker's control plane); ``control_shadow`` (``_http``): the gateway that runs Envoy,
  for the mirrored shadow samples, marked with ``x-ps-shadow``;
- admin on loopback only; ``layered_runtime`` with an admin layer (weights and the shadow
  fraction are runtime keys the control plane sets with ``/runtime_modify``).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonclient.grpc import service_pb2 as pb

from server.catalog import PRECISION_ORDER, Repository
from server.metrics import LATENCY_BUCKETS
from server.routing.policies import Router, ShadowPolicy, SplitPolicy
from server.routing.slo import SloPolicy

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
INFER_PATH = r"^/v2/models/[A-Za-z0-9_.-]+(/versions/1)?/infer$"  # (select.lua reads the same)
ROUTE_HEADER = "x-ps-route"
PRECISION_HEADER = "x-precision"
CONTROL_GRPC = "control_grpc"
CONTROL_HTTP = "control_http"
# shadow samples: Envoy mirrors them to the control plane through this cluster (HTTP: + "_http"),
# which marks them with SHADOW_HEADER = the plan's shadow_token (server/dataplane/gateway.py)
CONTROL_SHADOW = "control_shadow"
SHADOW_HEADER = "x-ps-shadow"
HERE = Path(__file__).resolve().parent
SELECT_LUA = HERE / "select.lua"
REWRITE_LUA = HERE / "rewrite.lua"
LUA = "envoy.filters.http.lua"
# gRPC statuses after which the next attempt goes to the next group of the chain (Envoy's
# retry-on names; NOT_FOUND, Triton's answer for an unloaded model, by the grpc-status header)
RETRY_ON = "unavailable,resource-exhausted,internal,cancelled,connect-failure,reset,refused-stream"
NOT_FOUND = "5"
FALLBACK = "fallback_from"  # the reply parameter naming the precision routed first
HEALTH_INTERVAL_S = 1.0  # replicas' TCP health check
SPLIT_KEY = "ps.split.{model}.{index}"
SHADOW_KEY = "ps.shadow.{model}"
# Envoy merges its workers' histograms into what /stats shows at each stats flush (default 5 s):
# with an slo model routed in Envoy it flushes this often, so the slo loop's windows see their
# latencies (server/front/slo.py)
SLO_FLUSH_S = 0.25


@dataclass(frozen=True)
class Kind:
    """gRPC or HTTP inference: its route-header prefix (select.lua), cluster-name suffix and the
    match every one of its routes starts from."""

    route: str
    cluster: str
    match: tuple[tuple[str, Any], ...]
    retry_on: str
    retriable: tuple[dict[str, Any], ...] = ()
    retriable_codes: tuple[int, ...] = ()
    protocol: str = "grpc"  # the label of its series (server/front/metrics.py)

    def name(self, variant: str) -> str:
        return variant + self.cluster

    def stat_prefix(self, model: str, precision: str, policy: bool) -> str:
        """A model route's stats (``vhost.gateway.route.<this>.*``, read back by
        :func:`route_of`): ``@`` where the policy routed, ``:`` where the client asked."""
        return f"ps:{self.protocol}:{model}{'@' if policy else ':'}{precision}"


GRPC = Kind(
    "",
    "",
    (("path", MODEL_INFER),),
    RETRY_ON + ",retriable-headers",
    ({"name": "grpc-status", "string_match": {"exact": NOT_FOUND}},),
)
# HTTP: Triton's 404 (model not found: unloaded) and 503 (unavailable) go to the next attempt
HTTP = Kind(
    "h",
    "_http",
    (("safe_regex", {"regex": INFER_PATH}),),
    "connect-failure,reset,refused-stream,retriable-status-codes",
    retriable_codes=(404, 503),
    protocol="http",
)
# a model route's attempts and retries: Envoy's per-route stats (Route.stat_prefix,
# Kind.stat_prefix); its requests = attempts - retries
_ROUTE_STAT = re.compile(
    r"^vhost\.gateway\.route\.ps:(grpc|http):(.+)([@:])([^@:]+)\.upstream_rq_(total|retry)$"
)
ROUTE_STATS = r"^vhost\.gateway\.route\.ps:.*\.upstream_rq_(total|retry)$"


def route_of(stat: str) -> tuple[str, str, str, bool, str] | None:
    """(protocol, model, precision, routed by the policy, ``total`` or ``retry``) of a model
    route's counter (``vhost.gateway.route.<Kind.stat_prefix>.upstream_rq_<total|retry>``: its
    attempts or retries), else None."""
    match = _ROUTE_STAT.match(stat)
    if match is None:
        return None
    protocol, model, sep, precision, counter = match.groups()
    return protocol, model, precision, sep == "@", counter


def _type(name: str) -> str:
    return f"type.googleapis.com/{name}"


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _percent(fraction: float) -> dict[str, Any]:
    return {"numerator": round(fraction * 100), "denominator": "HUNDRED"}


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        host, _, port = text.strip().rpartition(":")
        return cls(host.strip("[]"), int(port))

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


@dataclass(frozen=True)
class Replicas:
    """The Triton replicas a variant's clusters hold, with the front settings of the upstream
    URL that names them (``--upstream`` or, with precision pools, the variant's pool)."""

    endpoints: tuple[Endpoint, ...]  # gRPC addresses
    dns: bool = False  # endpoints = a name's addresses (STRICT_DNS)
    resolve_interval_s: float = 5.0
    http_port: int = 0  # 0: HTTP inference via the control plane
    timeout_s: float = 30.0  # a forwarded call without grpc-timeout

    @property
    def several(self) -> bool:
        """More than one replica (or a name that may resolve to several)."""
        return len(self.endpoints) > 1 or self.dns


@dataclass(frozen=True)
class ModelPlan:
    """A logical model's routes: ``first`` = (precision, share) of first attempts (the policy),
    ``chains`` = precision -> the variants tried in turn from it (the fallback chain),
    ``shadow`` = (reference variant, fraction) mirrored, or None; ``slo``: the shares of
    ``first`` are the slo controller's, set at run time (server/front/slo.py)."""

    name: str
    first: tuple[tuple[str, float], ...]
    chains: dict[str, tuple[str, ...]]
    shadow: tuple[str, float] | None = None
    slo: bool = False


@dataclass(frozen=True)
class FrontPlan:
    """Everything the bootstrap is made from."""

    host: str  # the public address
    grpc_port: int  # 0: the OS picks (read back from the admin endpoint)
    http_port: int
    control_grpc_port: int  # the gateway behind Envoy, on loopback
    control_http_port: int
    triton: tuple[Endpoint, ...]  # the replicas' gRPC addresses
    variants: dict[str, str]  # Triton-served variant name -> precision
    models: tuple[ModelPlan, ...]
    body_limit: int  # bytes: the largest valid request + envelope (gRPC)
    max_streams: int  # concurrent streams per HTTP/2 connection
    header_timeout_s: float  # request headers must arrive within this
    default_timeout_s: float  # a forwarded call without grpc-timeout
    token: str | None = None
    triton_http_port: int = 0  # the replicas' HTTP port (0: HTTP inference via the control plane)
    http_body_limit: int = (
        0  # bytes of an HTTP body (JSON tensors: --max-request-bytes); 0: body_limit
    )
    tls: tuple[Path, Path] | None = None  # cert, key
    dns: bool = False  # replicas = a name's addresses (STRICT_DNS)
    resolve_interval_s: float = 5.0
    control_host: str = "127.0.0.1"
    # ``--workers N``: the other workers' control planes, (gRPC, HTTP) ports on control_host;
    # the control clusters spread over them and this one (the shadow cluster stays here)
    control_peers: tuple[tuple[int, int], ...] = ()
    # the listeners share their ports with the --workers supervisor's held reservation
    reuse_port: bool = False
    admin_port: int = 0
    idle_timeout_s: float = 3600.0
    # the mark on mirrored shadow samples (x-ps-shadow): a secret of this plan, so a client
    # cannot pass its own requests off as samples (the control plane checks it)
    shadow_token: str = field(default_factory=lambda: secrets.token_hex(16))
    extra: dict[str, Any] = field(default_factory=dict)
    # precision pools: variant -> its pool's replicas (a variant not listed: ``triton`` & co.)
    pools: dict[str, Replicas] = field(default_factory=dict)

    def replicas(self, variant: str) -> Replicas:
        """Where ``variant``'s requests go: its pool's replicas, else the ``--upstream``'s."""
        found = self.pools.get(variant)
        if found is not None:
            return found
        return Replicas(
            self.triton,
            self.dns,
            self.resolve_interval_s,
            self.triton_http_port,
            self.default_timeout_s,
        )

    @property
    def http(self) -> bool:
        """HTTP inference in Envoy: the replicas' HTTP port is known (for every variant)."""
        if not self.pools:
            return bool(self.triton_http_port)
        return bool(self.variants) and all(self.replicas(v).http_port for v in self.variants)


def plan_models(
    repository: Repository, router: Router, served: Iterable[str], elsewhere: Iterable[str] = ()
) -> list[ModelPlan]:
    """Each logical model's first attempts, fallback chains and shadow, from its policy. Only
    Triton-served variants (``served``) are routed; a policy whose precision is not served
    leaves the model to the control plane (no routes: ``select.lua`` sends it to Python). A
    chain that reaches a variant of ``elsewhere`` (served by another upstream of the control
    plane: an embedded precision pool) is left to the control plane too, so its fallback is
    Python's; a variant neither served nor elsewhere (a broken config) is skipped, as Python
    skips it (never ready)."""
    served, elsewhere = set(served), set(elsewhere)
    plans = []
    for name, model in repository.models.items():
        by_precision = {p: v.name for p, v in model.variants.items() if v.name in served}
        away = {p for p, v in model.variants.items() if v.name in elsewhere}
        chains = {}
        for p in by_precision:
            candidates = router.candidates(name, p)
            if not away.intersection(candidates):
                chains[p] = tuple(by_precision[c] for c in candidates if c in by_precision)
        if not chains:
            continue
        policy = router.policies[name]
        slo = isinstance(policy, SloPolicy) and len(policy.controller.rungs) > 1
        if isinstance(policy, SplitPolicy):
            shares, low = {}, 0.0
            for bound, precision in policy.cumulative:
                shares[precision] = bound - low
                low = bound
            first = [(p, shares[p]) for p in ordered(shares)]
        elif slo:  # one route per rung of the ladder, weighted by the controller's mix
            shares = policy.controller.shares()
            first = [(p, shares[p]) for p in ordered(shares)]
        else:  # fixed, auto, shadow, slo with one rung: one precision
            first = [(policy.default_precision, 1.0)]
        if any(p not in chains for p, _ in first):
            continue
        shadow = None
        if isinstance(policy, ShadowPolicy) and policy.fraction > 0:
            reference = by_precision.get(policy.reference)
            shadow = (reference, policy.fraction) if reference else None
        plans.append(ModelPlan(name, tuple(first), chains, shadow, slo))
    return plans


def request_suffix(variant: str) -> bytes:
    """Appended to a client's ModelInferRequest: Triton serves ``variant`` (last value wins)."""
    return pb.ModelInferRequest(model_name=variant).SerializeToString()


def reply_suffix(precision: str, parameter: str = "precision") -> bytes:
    """Appended to Triton's reply: ``parameters["precision"]`` (or ``fallback_from``), as the
    Python path adds it."""
    msg = pb.ModelInferResponse()
    msg.parameters[parameter].string_param = precision
    return msg.SerializeToString()


# ---- clusters --------------------------------------------------------------------------------
def _header(key: str, value: str) -> dict[str, Any]:
    return {
        "append": {
            "header": {"key": key, "value": value},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
    }


def _mutation(
    name: str, request: list[Any], response: list[Any], trailers: list[Any] | None = None
) -> dict[str, Any]:
    mutations: dict[str, Any] = {}
    if request:
        mutations["request_mutations"] = request
    if response:
        mutations["response_mutations"] = response
    if trailers:
        mutations["response_trailers_mutations"] = trailers
    return {
        "name": name,
        "typed_config": {
            "@type": _type("envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"),
            "mutations": mutations,
        },
    }


def _lua(path: Path) -> dict[str, Any]:
    return {
        "name": LUA,
        "typed_config": {
            "@type": _type("envoy.extensions.filters.http.lua.v3.Lua"),
            "default_source_code": {"filename": str(path)},
        },
    }


def _h2(max_streams: int | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if max_streams:
        options["max_concurrent_streams"] = max_streams
    return options


def _load_assignment(name: str, endpoints: Iterable[Endpoint]) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [
            {
                "lb_endpoints": [
                    {"endpoint": {"address": _address(e.host, e.port)}} for e in endpoints
                ]
            }
        ],
    }


def variant_cluster(plan: FrontPlan, variant: str, precision: str) -> dict[str, Any]:
    """A Triton-served variant: the replicas over HTTP/2; per attempt, ``model_name`` rewritten
    to the variant and ``parameters["precision"]`` added to the reply (rewrite.lua), and the
    ``x-precision`` response header."""
    request = [
        _header("x-ps-variant", variant),
        _header("x-ps-precision", precision),
        _header("x-ps-rewrite", request_suffix(variant).hex()),
    ]
    response = [
        _header(PRECISION_HEADER, precision),
        _header("x-ps-reply", reply_suffix(precision).hex()),
    ]
    replicas = plan.replicas(variant)
    cluster = _cluster(plan, variant, replicas.endpoints, replicas.dns, replicas.resolve_interval_s)
    cluster["typed_extension_protocol_options"] = _protocol_options(
        http2=True,
        filters=[
            _mutation("ps.request", request, []),
            _lua(REWRITE_LUA),
            # x-precision: a header, and a trailer as the Python path sends it
            _mutation("ps.response", [], response, [_header(PRECISION_HEADER, precision)]),
        ],
    )
    _balanced(cluster)
    return cluster


# gRPC calls by grpc-status, on the route's cluster (the routed variant; after select.lua, which
# sets the route): cluster.<variant>.grpc.inference.GRPCInferenceService.ModelInfer.<code>.
# Envoy's router counts every gRPC reply as a 200, whatever Triton said in the trailers; this
# filter is downstream only (not per attempt), so a fallback counts on the first precision
_GRPC_STATS = {
    "name": "envoy.filters.http.grpc_stats",
    "typed_config": {
        "@type": _type("envoy.extensions.filters.http.grpc_stats.v3.FilterConfig"),
        "stats_for_all_methods": True,
    },
}


def stats_config() -> dict[str, Any]:
    """The clusters' ``upstream_rq_time`` histograms (milliseconds) with the project's latency
    buckets (server/metrics.py, docs/metrics.md), so the gateway re-exports them unchanged."""
    buckets = [round(b * 1000, 3) for b in LATENCY_BUCKETS]
    return {
        "histogram_bucket_settings": [
            {
                "match": {"safe_regex": {"regex": r"^cluster\..*\.upstream_rq_time$"}},
                "buckets": buckets,
            }
        ]
    }


def _balanced(cluster: dict[str, Any]) -> None:
    """Round robin; a replica that refuses connections is taken out at once, and put back by
    the health check. Not least-request: a dead replica holds no active requests, so
    least-request picked it again for the retries and the previous-hosts predicate gave up after
    its reselections: the chain then fell back to the next precision (the replica-kill soak,
    lab/tests/test_soak.py, lost 189-1,856 requests that way; none with round robin)."""
    cluster["lb_policy"] = "ROUND_ROBIN"
    # Envoy's default allows 3 retries in flight per cluster: when a replica dies under load,
    # more requests than that need their retry on the other replica at once
    cluster["circuit_breakers"] = {"thresholds": [{"priority": "DEFAULT", "max_retries": 1024}]}
    cluster["outlier_detection"] = {
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 1,
        "consecutive_gateway_failure": 3,
        "interval": "1s",
        "base_ejection_time": "2s",
        "max_ejection_percent": 100,
    }
    cluster["health_checks"] = [
        {
            "timeout": "1s",
            "interval": _duration(HEALTH_INTERVAL_S),
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
            "tcp_health_check": {},
        }
    ]


def variant_http_cluster(plan: FrontPlan, variant: str, precision: str) -> dict[str, Any]:
    """The same variant over Triton's HTTP port: the path rewritten per attempt (rewrite.lua),
    the ``x-precision`` response header."""
    request = [_header("x-ps-variant", variant), _header("x-ps-precision", precision)]
    replicas = plan.replicas(variant)
    endpoints = [Endpoint(e.host, replicas.http_port) for e in replicas.endpoints]
    cluster = _cluster(
        plan, HTTP.name(variant), endpoints, replicas.dns, replicas.resolve_interval_s
    )
    cluster["typed_extension_protocol_options"] = _protocol_options(
        http2=False,
        filters=[
            _mutation("ps.request", request, []),
            _lua(REWRITE_LUA),
            _mutation("ps.response", [], [_header(PRECISION_HEADER, precision)]),
        ],
    )
    _balanced(cluster)
    return cluster


def _protocol_options(http2: bool, filters: list[dict[str, Any]] | None = None) -> dict:
    options: dict[str, Any] = {
        "@type": _type("envoy.extensions.upstreams.http.v3.HttpProtocolOptions"),
        "explicit_http_config": (
            {"http2_protocol_options": _h2()} if http2 else {"http_protocol_options": {}}
        ),
    }
    if filters:
        options["http_filters"] = [
            *filters,
            {
                "name": "envoy.filters.http.upstream_codec",
                "typed_config": {
                    "@type": _type("envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec")
                },
            },
        ]
    return {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options}


def _cluster(
    plan: FrontPlan,
    name: str,
    endpoints: Iterable[Endpoint],
    dns: bool = False,
    interval_s: float | None = None,
) -> dict[str, Any]:
    endpoints = list(endpoints)
    cluster: dict[str, Any] = {
        "name": name,
        "connect_timeout": "1s",
        "load_assignment": _load_assignment(name, endpoints),
    }
    if dns or not all(e.is_ip for e in endpoints):
        cluster["type"] = "STRICT_DNS"
        cluster["dns_refresh_rate"] = _duration(interval_s or plan.resolve_interval_s)
        cluster["respect_dns_ttl"] = False
        # every A and AAAA address is a replica, as for triton+dns in Python (Envoy's default,
        # AUTO, takes the AAAA answer alone when there is one: localhost would be ::1 only);
        # the health check keeps out an address nothing listens on
        cluster["dns_lookup_family"] = "ALL"
    else:
        cluster["type"] = "STATIC"
    return cluster


def control_clusters(plan: FrontPlan) -> list[dict[str, Any]]:
    """The Python gateway behind Envoy: gRPC over HTTP/2, HTTP over HTTP/1.1; with ``--workers
    N``, every worker's control plane (round robin, Envoy's default)."""
    ports = [(plan.control_grpc_port, plan.control_http_port), *plan.control_peers]
    grpc = _cluster(plan, CONTROL_GRPC, [Endpoint(plan.control_host, g) for g, _ in ports])
    grpc["typed_extension_protocol_options"] = _protocol_options(http2=True)
    http = _cluster(plan, CONTROL_HTTP, [Endpoint(plan.control_host, h) for _, h in ports])
    http["typed_extension_protocol_options"] = _protocol_options(http2=False)
    clusters = [grpc, http]
    if any(m.shadow for m in plan.models):
        clusters.append(shadow_cluster(plan, GRPC))
        if plan.triton_http_port:
            clusters.append(shadow_cluster(plan, HTTP))
    return clusters


def shadow_cluster(plan: FrontPlan, kind: Kind) -> dict[str, Any]:
    """Where Envoy mirrors a shadow model's sampled requests: the control plane, which runs them
    on the served precision and the reference and compares (Envoy drops a mirror's reply, so it
    cannot compare itself); an upstream header mutation marks them with the plan's token."""
    port = plan.control_grpc_port if kind is GRPC else plan.control_http_port
    cluster = _cluster(plan, kind.name(CONTROL_SHADOW), [Endpoint(plan.control_host, port)])
    mark = _mutation("ps.shadow", [_header(SHADOW_HEADER, plan.shadow_token)], [])
    cluster["typed_extension_protocol_options"] = _protocol_options(kind is GRPC, [mark])
    return cluster


# ---- routes ----------------------------------------------------------------------------------
def _match(kind: Kind, route: str | None = None) -> dict[str, Any]:
    match: dict[str, Any] = dict(kind.match)
    if route is not None:
        match["headers"] = [{"name": ROUTE_HEADER, "string_match": {"exact": kind.route + route}}]
    return match


def _timeouts(plan: FrontPlan, variants: Iterable[str]) -> dict[str, Any]:
    """A call's deadline: its grpc-timeout, else the upstream's default (the longest of the
    pools a chain crosses)."""
    seconds = max(plan.replicas(v).timeout_s for v in variants)
    return {
        "timeout": _duration(seconds),
        "max_stream_duration": {"grpc_timeout_header_max": "0s"},
    }


def _retry(kind: Kind, retries: int, refresh: bool) -> dict[str, Any]:
    policy: dict[str, Any] = {
        "retry_on": kind.retry_on,
        "num_retries": retries,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": {
                    "@type": _type(
                        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                    )
                },
            }
        ],
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {"base_interval": "0.001s", "max_interval": "0.010s"},
    }
    if kind.retriable:
        policy["retriable_headers"] = list(kind.retriable)
    if kind.retriable_codes:
        policy["retriable_status_codes"] = list(kind.retriable_codes)
    if refresh:
        policy["refresh_cluster_on_retry"] = True
    return policy


def _groups(plan: FrontPlan, chain: tuple[str, ...]) -> list[str]:
    """The clusters tried in turn: each precision once per replica (at most twice), so an
    unavailable replica is retried on another before the next precision."""
    return [v for v in chain for _ in range(2 if plan.replicas(v).several else 1)]


def _first(precision: str) -> list[dict[str, Any]]:
    """A chain route's request headers: the precision routed to first and the reply parameter
    a later attempt adds (``fallback_from``, rewrite.lua)."""
    return [
        {"header": h["append"]["header"], "append_action": h["append"]["append_action"]}
        for h in (
            _header("x-ps-first", precision),
            _header("x-ps-fallback", reply_suffix(precision, FALLBACK).hex()),
        )
    ]


def _chain_route(plan: FrontPlan, kind: Kind, chain: tuple[str, ...]) -> dict[str, Any]:
    """The variants of ``chain`` tried in turn (one priority group per attempt). A chain of one
    attempt is a plain cluster route without a retry policy (a retry policy alone makes Envoy
    keep the body for a replay: ~0.025 ms of CPU per request, measured)."""
    groups = [kind.name(v) for v in _groups(plan, chain)]
    if len(groups) == 1:
        return {"cluster": groups[0], **_timeouts(plan, chain)}
    return {
        "inline_cluster_specifier_plugin": {
            "extension": {
                "name": "envoy.router.cluster_specifier_plugin.priority_group",
                "typed_config": {
                    "@type": _type(
                        "envoy.extensions.router.cluster_specifiers.priority_group.v3."
                        "PriorityGroupClusterSpecifier"
                    ),
                    "priority_groups": [
                        {"name": f"{i}:{v}", "clusters": [{"cluster_name": v, "weight": 1}]}
                        for i, v in enumerate(groups)
                    ],
                },
            }
        },
        "retry_policy": _retry(kind, len(groups) - 1, refresh=True),
        **_timeouts(plan, chain),
    }


def model_routes(plan: FrontPlan, model: ModelPlan, kind: Kind = GRPC) -> list[dict[str, Any]]:
    """``m:<model>:<precision>``: that precision's chain; ``m:<model>``: the policy - one route
    per first-attempt precision, matched by a cumulative runtime fraction (the routes share one
    random value per request), each its precision's chain, the last one unconditional."""
    routes = [
        {
            "name": f"{kind.route}{model.name}:{precision}",
            "match": _match(kind, f"m:{model.name}:{precision}"),
            "route": _chain_route(plan, kind, chain),
            "request_headers_to_add": _first(precision),
            "stat_prefix": kind.stat_prefix(model.name, precision, policy=False),
        }
        for precision, chain in model.chains.items()
    ]
    cumulative = 0.0
    for index, (precision, share) in enumerate(model.first):
        match = _match(kind, f"m:{model.name}")
        last = index == len(model.first) - 1
        if not last:
            cumulative += share
            match["runtime_fraction"] = {
                "default_value": _percent(cumulative),
                "runtime_key": SPLIT_KEY.format(model=model.name, index=index),
            }
        action = _chain_route(plan, kind, model.chains[precision])
        if model.shadow is not None:  # sampled by the control plane (shadow_cluster)
            _, fraction = model.shadow
            action["request_mirror_policies"] = [
                {
                    "cluster": kind.name(CONTROL_SHADOW),
                    # the client's authority unchanged (x-ps-shadow marks the sample)
                    "disable_shadow_host_suffix_append": True,
                    "runtime_fraction": {
                        "default_value": _percent(fraction),
                        "runtime_key": SHADOW_KEY.format(model=model.name),
                    },
                }
            ]
        routes.append(
            {
                "name": f"{kind.route}{model.name}@{precision}",
                "match": match,
                "route": action,
                "request_headers_to_add": _first(precision),
                "stat_prefix": kind.stat_prefix(model.name, precision, policy=True),
            }
        )
    return routes


def _catalog(plan: FrontPlan) -> dict[str, Any]:
    """select.lua's data: the variants and each model's precisions (routed in Envoy)."""
    catalog: dict[str, Any] = {
        "variants": dict.fromkeys(plan.variants, True),
        "models": {m.name: dict.fromkeys(m.chains, True) for m in plan.models},
    }
    if plan.token:
        catalog["token"] = plan.token
    catalog["http"] = plan.http
    return catalog


LUA_OFF = {
    LUA: {"@type": _type("envoy.extensions.filters.http.lua.v3.LuaPerRoute"), "disabled": True}
}


def infer_routes(plan: FrontPlan, kind: Kind, control: str) -> list[dict[str, Any]]:
    """A kind's inference routes: each variant by name, each model's chains and policy, and
    the rest of its inference to the control plane (``control``); all with select.lua's data."""
    routes: list[dict[str, Any]] = []
    for variant in plan.variants:
        action: dict[str, Any] = {"cluster": kind.name(variant), **_timeouts(plan, [variant])}
        if plan.replicas(variant).several:  # another replica when one is gone (else no retry)
            action["retry_policy"] = _retry(kind, 2, False)
        routes.append(
            {"name": kind.route + variant, "match": _match(kind, f"v:{variant}"), "route": action}
        )
    for model in plan.models:
        routes += model_routes(plan, model, kind)
    routes.append(  # inference that Envoy does not route: the control plane decodes it
        {"name": f"{kind.route}infer:control", "match": _match(kind), "route": _control(control)}
    )
    for route in routes:
        route["metadata"] = {"filter_metadata": {LUA: {"catalog": _catalog(plan)}}}
    return routes


def _control(cluster: str) -> dict[str, Any]:
    return {"cluster": cluster, "timeout": "0s"}


def _route_config(
    plan: FrontPlan, name: str, routes: list[dict[str, Any]], control: str, limit: int
) -> dict:
    routes = [
        *routes,
        {
            "name": "control",
            "match": {"prefix": "/"},
            "route": _control(control),
            "typed_per_filter_config": LUA_OFF,
        },
    ]
    return {
        "name": name,
        "virtual_hosts": [
            {
                "name": "gateway",
                "domains": ["*"],
                "routes": routes,
                "request_body_buffer_limit": limit,
            }
        ],
    }


def grpc_routes(plan: FrontPlan) -> dict[str, Any]:
    """gRPC: ModelInfer through select.lua and the routes; the rest to the control plane."""
    routes = infer_routes(plan, GRPC, CONTROL_GRPC)
    return _route_config(plan, "grpc", routes, CONTROL_GRPC, plan.body_limit)


def http_routes(plan: FrontPlan) -> dict[str, Any]:
    """HTTP: ``/v2/models/M/infer`` routed as gRPC's ModelInfer when the replicas' HTTP port is
    known (``?http=PORT``), else (and everything else) to the control plane."""
    routes = infer_routes(plan, HTTP, CONTROL_HTTP) if plan.http else []
    limit = plan.http_body_limit or plan.body_limit
    return _route_config(plan, "http", routes, CONTROL_HTTP, limit)


# ---- listeners, admin, runtime ---------------------------------------------------------------
def _hcm(plan: FrontPlan, name: str, routes: dict[str, Any], lua: bool) -> dict[str, Any]:
    """``lua``: select.lua runs on the listener's inference routes."""
    filters = [_lua(SELECT_LUA)] if lua else []
    if name == "grpc":
        filters.append(_GRPC_STATS)
    filters.append(
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": _type("envoy.extensions.filters.http.router.v3.Router")},
        }
    )
    hcm = {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": _type(
                "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
            ),
            "stat_prefix": name,
            "codec_type": "AUTO",
            "route_config": routes,
            "http_filters": filters,
            "http2_protocol_options": _h2(plan.max_streams),
            "request_headers_timeout": _duration(plan.header_timeout_s),
            "common_http_protocol_options": {"idle_timeout": _duration(plan.idle_timeout_s)},
            # Envoy adds no headers of its own to what the gateway's clients see
            "server_header_transformation": "PASS_THROUGH",
        },
    }
    if name == "grpc":
        hcm["typed_config"]["local_reply_config"] = {"mappers": [_too_large()]}
    return hcm


def _too_large() -> dict[str, Any]:
    """gRPC: a body over the buffer limit is RESOURCE_EXHAUSTED, as with the Python front
    (Envoy's own mapping of its 413 "Payload Too Large" says UNKNOWN)."""
    return {
        "filter": {
            "status_code_filter": {
                "comparison": {
                    "op": "EQ",
                    "value": {"default_value": 413, "runtime_key": "ps.too_large"},
                }
            }
        },
        "headers_to_add": [
            {
                "header": {"key": "grpc-status", "value": "8"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            },
        ],
    }


def _tls(plan: FrontPlan) -> dict[str, Any]:
    assert plan.tls is not None
    cert, key = plan.tls
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": _type("envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"),
            "common_tls_context": {
                "tls_certificates": [
                    {
                        "certificate_chain": {"filename": str(cert)},
                        "private_key": {"filename": str(key)},
                    }
                ],
                "alpn_protocols": ["h2", "http/1.1"],
            },
        },
    }


def _listener(plan: FrontPlan, name: str, port: int, hcm: dict[str, Any]) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": [hcm]}
    if plan.tls is not None:
        chain["transport_socket"] = _tls(plan)
    listener = {
        "name": name,
        "address": _address(plan.host, port),
        "per_connection_buffer_limit_bytes": 1024 * 1024,
        "filter_chains": [chain],
    }
    if plan.reuse_port:  # Envoy's default on Linux, said out loud where it is needed
        listener["enable_reuse_port"] = True
    return listener


def bootstrap(plan: FrontPlan) -> dict[str, Any]:
    """Envoy's whole configuration (static resources, admin, runtime) as data."""
    clusters = [variant_cluster(plan, v, p) for v, p in plan.variants.items()]
    if plan.http:
        clusters += [variant_http_cluster(plan, v, p) for v, p in plan.variants.items()]
    slo = any(m.slo for m in plan.models)
    flush = {"stats_flush_interval": _duration(SLO_FLUSH_S)} if slo else {}
    return {
        "node": {"id": "precision-serve", "cluster": "precision-serve"},
        "admin": {"address": _address("127.0.0.1", plan.admin_port)},
        "stats_config": stats_config(),
        **flush,
        "layered_runtime": {
            "layers": [
                {"name": "static", "static_layer": {}},
                {"name": "admin", "admin_layer": {}},
            ]
        },
        "static_resources": {
            "listeners": [
                _listener(
                    plan, "grpc", plan.grpc_port, _hcm(plan, "grpc", grpc_routes(plan), lua=True)
                ),
                _listener(
                    plan,
                    "http",
                    plan.http_port,
                    _hcm(plan, "http", http_routes(plan), lua=plan.http),
                ),
            ],
            "clusters": [*clusters, *control_clusters(plan)],
        },
        **plan.extra,
    }


def ordered(precisions: Iterable[str]) -> list[str]:
    """The order of a split's routes (and of its runtime keys): most accurate first."""
    rank = {p: i for i, p in enumerate(PRECISION_ORDER)}
    return sorted(precisions, key=lambda p: (rank.get(p, len(rank)), p))


def split_runtime(model: str, weights: dict[str, float]) -> dict[str, int]:
    """Runtime values that make a split model's routes share first attempts by ``weights``
    (precision -> weight, the precisions of its routing file's split): cumulative whole
    percents, one key per route but the last (routes in :func:`ordered` order)."""
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("weights must add up to more than 0")
    out, cumulative = {}, 0.0
    for index, precision in enumerate(ordered(weights)[:-1]):
        cumulative += weights[precision] / total
        out[SPLIT_KEY.format(model=model, index=index)] = round(cumulative * 100)
    return out


def triton_endpoints(address: str) -> tuple[Endpoint, ...]:
    """``"h:8001,h2:8001"`` (an ``--upstream`` URL's address) -> the replicas."""
    return tuple(Endpoint.parse(part) for part in address.split(",") if part.strip())


def served_variants(repository: Repository) -> dict[str, str]:
    """Variant name -> precision, for every variant Triton can be asked for (a variant whose
    config could not be read stays with the control plane, which reports it unready)."""
    return {v.name: v.precision for v in repository.variants() if v.problem is None}


def ready_weights(model: ModelPlan, ready: set[str]) -> dict[str, float]:
    """A split model's first-attempt weights with the precisions whose variant is unready on
    every replica left out (``ready``: the precisions that are not); all unready: the routing
    file's weights (the chains' fallback still serves)."""
    shares = {p: share for p, share in model.first}
    kept = {p: share if p in ready else 0.0 for p, share in shares.items()}
    return kept if sum(kept.values()) > 0 else shares
