"""The Envoy front's configuration (server/front/config.py): generated as data, written as JSON,
parsed back, accepted by ``envoy --mode validate``; each policy maps onto Envoy's primitives."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from tritonclient.grpc import service_pb2 as pb

from server.catalog import Repository, load_repository
from server.front.config import (
    CONTROL_GRPC,
    CONTROL_HTTP,
    CONTROL_SHADOW,
    MODEL_INFER,
    SHADOW_HEADER,
    FrontPlan,
    bootstrap,
    plan_models,
    ready_weights,
    reply_suffix,
    request_suffix,
    route_of,
    served_variants,
    split_runtime,
    triton_endpoints,
)
from server.front.supervisor import envoy_binary, validate
from server.routing.policies import Router, parse_routing


@pytest.fixture(scope="module")
def repository(tiny_repository: Path) -> Repository:
    return load_repository(tiny_repository)


def _plan(repository: Repository, routing: dict[str, Any], **changes: Any) -> FrontPlan:
    router = Router(repository, parse_routing(routing))
    variants = served_variants(repository)
    fields: dict[str, Any] = {
        "host": "127.0.0.1",
        "grpc_port": 0,
        "http_port": 0,
        "control_grpc_port": 40001,
        "control_http_port": 40000,
        "triton": triton_endpoints("127.0.0.1:8001"),
        "variants": variants,
        "models": tuple(plan_models(repository, router, variants)),
        "body_limit": 3_000_000,
        "max_streams": 128,
        "header_timeout_s": 10.0,
        "default_timeout_s": 30.0,
        **changes,
    }
    return FrontPlan(**fields)


def _routes(config: dict[str, Any], listener: str = "grpc") -> list[dict[str, Any]]:
    (found,) = [x for x in config["static_resources"]["listeners"] if x["name"] == listener]
    hcm = found["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"]


def _by_route_header(routes: list[dict[str, Any]], value: str) -> list[dict[str, Any]]:
    return [
        r
        for r in routes
        if any(h["string_match"]["exact"] == value for h in r["match"].get("headers", []))
    ]


def _chain(route: dict[str, Any]) -> list[str]:
    """The clusters a route tries in turn (a plain cluster route: one)."""
    if "cluster" in route["route"]:
        return [route["route"]["cluster"]]
    spec = route["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"]
    return [g["clusters"][0]["cluster_name"] for g in spec["priority_groups"]]


def test_bootstrap_round_trips_through_json_and_envoy_validates_it(
    repository: Repository, tmp_path: Path
) -> None:
    routing = {
        "models": {
            "tiny": {
                "policy": "split",
                "weights": {"int8": 70, "fp16": 30},
                "shadow": {"reference": "fp32", "fraction": 0.25},
            }
        }
    }
    config = bootstrap(_plan(repository, routing, token="s3cret", triton_http_port=8000))
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    assert json.loads(path.read_text()) == config
    assert validate(path) == ""
    # a broken one is refused, with Envoy's reason
    config["static_resources"]["clusters"][0]["lb_policy"] = "NO_SUCH_POLICY"
    path.write_text(json.dumps(config))
    assert "NO_SUCH_POLICY" in validate(path)


def test_clusters_are_named_after_the_variants_and_rewrite_per_attempt(
    repository: Repository,
) -> None:
    config = bootstrap(_plan(repository, {}))
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert set(clusters) == {"tiny_fp32", "tiny_fp16", "tiny_int8", CONTROL_GRPC, CONTROL_HTTP}
    int8 = clusters["tiny_int8"]
    options = int8["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    names = [f["name"] for f in options["http_filters"]]
    assert names == [
        "ps.request",
        "envoy.filters.http.lua",
        "ps.response",
        "envoy.filters.http.upstream_codec",
    ]
    mutations = {
        m["append"]["header"]["key"]: m["append"]["header"]["value"]
        for f in options["http_filters"]
        if f["name"].startswith("ps.")
        for kind in ("request_mutations", "response_mutations")
        for m in f["typed_config"]["mutations"].get(kind, [])
    }
    # the bytes appended to a client's request make Triton serve the variant (last field wins)
    client = pb.ModelInferRequest(model_name="tiny", id="r1").SerializeToString()
    rewritten = pb.ModelInferRequest.FromString(client + bytes.fromhex(mutations["x-ps-rewrite"]))
    assert (rewritten.model_name, rewritten.id) == ("tiny_int8", "r1")
    assert request_suffix("tiny_int8").hex() == mutations["x-ps-rewrite"]
    # ... and those appended to Triton's reply add the precision parameter
    reply = pb.ModelInferResponse(model_name="tiny_int8").SerializeToString()
    merged = pb.ModelInferResponse.FromString(reply + bytes.fromhex(mutations["x-ps-reply"]))
    assert merged.parameters["precision"].string_param == "int8"
    assert (
        mutations["x-precision"] == "int8" and reply_suffix("int8").hex() == mutations["x-ps-reply"]
    )
    # the control plane sits on loopback, on the ports it was given
    grpc = clusters[CONTROL_GRPC]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    assert grpc["endpoint"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 40001,
    }
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    layers = [layer["name"] for layer in config["layered_runtime"]["layers"]]
    assert "admin" in layers


def test_fixed_policy_and_requested_precisions_follow_the_fallback_chain(
    repository: Repository,
) -> None:
    routes = _routes(bootstrap(_plan(repository, {"models": {"tiny": {"precision": "int8"}}})))
    (policy,) = _by_route_header(routes, "m:tiny")
    assert _chain(policy) == ["tiny_int8", "tiny_fp16", "tiny_fp32"]  # one replica: once each
    assert "runtime_fraction" not in policy["match"]
    (fp16,) = _by_route_header(routes, "m:tiny:fp16")
    assert _chain(fp16) == ["tiny_fp16", "tiny_fp32"]
    retry = fp16["route"]["retry_policy"]
    assert retry["num_retries"] == 1 and retry["refresh_cluster_on_retry"] is True
    (variant,) = _by_route_header(routes, "v:tiny_int8")
    assert variant["route"]["cluster"] == "tiny_int8"  # a variant by name: no fallback
    assert "retry_policy" not in variant["route"]  # one replica: nothing to retry on
    (fp32,) = _by_route_header(routes, "m:tiny:fp32")  # the chain's end: one attempt
    assert fp32["route"]["cluster"] == "tiny_fp32" and "retry_policy" not in fp32["route"]
    # the rest goes to the control plane; only ModelInfer passes the selecting filter
    assert routes[-2]["match"] == {"path": MODEL_INFER}
    assert routes[-2]["route"]["cluster"] == CONTROL_GRPC
    assert routes[-1]["match"] == {"prefix": "/"} and routes[-1]["typed_per_filter_config"]
    http = _routes(bootstrap(_plan(repository, {})), "http")
    assert [r["route"]["cluster"] for r in http] == [CONTROL_HTTP]


def test_two_replicas_retry_each_precision_on_another_replica_first(
    repository: Repository,
) -> None:
    plan = _plan(repository, {}, triton=triton_endpoints("127.0.0.1:1,127.0.0.2:1"))
    config = bootstrap(plan)
    (fp16,) = _by_route_header(_routes(config), "m:tiny:fp16")
    assert _chain(fp16) == ["tiny_fp16", "tiny_fp16", "tiny_fp32", "tiny_fp32"]
    # a dead replica must not attract the retries (least-request would pick it: it holds no
    # requests), and every request of a killed replica may need its retry at once
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"].startswith("tiny_"):
            assert cluster["lb_policy"] == "ROUND_ROBIN"
            (limits,) = cluster["circuit_breakers"]["thresholds"]
            assert limits["max_retries"] >= 1024


def test_split_is_cumulative_runtime_fractions(
    repository: Repository,
) -> None:
    routing = {
        "models": {
            "tiny": {
                "policy": "split",
                "weights": {"int8": 50, "fp16": 30, "fp32": 20},
            }
        }
    }
    policy = _by_route_header(_routes(bootstrap(_plan(repository, routing))), "m:tiny")
    fractions = [r["match"].get("runtime_fraction") for r in policy]
    # most accurate first, whatever the file's order: fp32 20, fp16 30, int8 50
    assert [_chain(r)[0] for r in policy] == ["tiny_fp32", "tiny_fp16", "tiny_int8"]
    assert [f["default_value"]["numerator"] for f in fractions[:-1]] == [20, 50]
    assert [f["runtime_key"] for f in fractions[:-1]] == ["ps.split.tiny.0", "ps.split.tiny.1"]
    assert fractions[-1] is None
    assert split_runtime("tiny", {"int8": 1, "fp16": 1, "fp32": 2}) == {
        "ps.split.tiny.0": 50,
        "ps.split.tiny.1": 75,
    }
    # health-driven: an unready precision gets no first attempts; none ready: the file's split
    (model,) = _plan(repository, routing).models
    assert ready_weights(model, {"fp16", "fp32"}) == pytest.approx(
        {"fp32": 0.2, "fp16": 0.3, "int8": 0.0}
    )
    assert split_runtime("tiny", ready_weights(model, {"fp16", "fp32"})) == {
        "ps.split.tiny.0": 40,
        "ps.split.tiny.1": 100,
    }
    assert ready_weights(model, set()) == ready_weights(model, {"fp32", "fp16", "int8"})


def test_shadow_mirrors_to_the_control_plane_marked_with_the_plans_token(
    repository: Repository, tmp_path: Path
) -> None:
    """Envoy drops a mirror's reply, so the sampled fraction goes to the control plane (which
    runs the served precision and the reference and compares), marked as a sample."""
    shadow = {"models": {"tiny": {"policy": "shadow", "precision": "int8"}}}
    plan = _plan(repository, shadow, triton_http_port=8000)
    config = bootstrap(plan)
    for listener, cluster, port in (
        ("grpc", CONTROL_SHADOW, 40001),
        ("http", CONTROL_SHADOW + "_http", 40000),
    ):
        (route,) = _by_route_header(
            _routes(config, listener), "m:tiny" if listener == "grpc" else "hm:tiny"
        )
        (mirror,) = route["route"]["request_mirror_policies"]
        assert mirror["cluster"] == cluster
        assert mirror["runtime_fraction"]["default_value"]["numerator"] == 10  # the default 0.1
        assert mirror["runtime_fraction"]["runtime_key"] == "ps.shadow.tiny"
        (found,) = [c for c in config["static_resources"]["clusters"] if c["name"] == cluster]
        endpoint = found["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        assert endpoint["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": port}
        options = found["typed_extension_protocol_options"][
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        ]
        (mark,) = options["http_filters"][0]["typed_config"]["mutations"]["request_mutations"]
        assert mark["append"]["header"] == {"key": SHADOW_HEADER, "value": plan.shadow_token}
    # a secret per plan (a client cannot pass its requests off as samples)
    assert (
        len(plan.shadow_token) >= 32 and plan.shadow_token != _plan(repository, shadow).shadow_token
    )
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    assert validate(path) == ""
    # no shadow model: no shadow cluster
    names = {c["name"] for c in bootstrap(_plan(repository, {}))["static_resources"]["clusters"]}
    assert not any(n.startswith(CONTROL_SHADOW) for n in names)


def test_model_routes_count_their_requests_by_policy_or_request(repository: Repository) -> None:
    """Each model route has Envoy's per-route stats, named so that the collector reads back the
    protocol, the model, the precision and whether the policy or the client chose it."""
    routing = {"models": {"tiny": {"policy": "split", "weights": {"int8": 50, "fp16": 50}}}}
    config = bootstrap(_plan(repository, routing, triton_http_port=8000))
    found = {}
    for listener in ("grpc", "http"):
        for route in _routes(config, listener):
            if "stat_prefix" in route:
                stat = f"vhost.gateway.route.{route['stat_prefix']}.upstream_rq_total"
                found[route["name"]] = route_of(stat)
    assert found == {
        "tiny@fp16": ("grpc", "tiny", "fp16", True, "total"),
        "tiny@int8": ("grpc", "tiny", "int8", True, "total"),
        **{f"tiny:{p}": ("grpc", "tiny", p, False, "total") for p in ("fp32", "fp16", "int8")},
        "htiny@fp16": ("http", "tiny", "fp16", True, "total"),
        "htiny@int8": ("http", "tiny", "int8", True, "total"),
        **{f"htiny:{p}": ("http", "tiny", p, False, "total") for p in ("fp32", "fp16", "int8")},
    }
    # a model name with dots and dashes reads back whole; other stats are not a route's
    assert route_of("vhost.gateway.route.ps:http:my.model-2:int8.upstream_rq_retry") == (
        "http",
        "my.model-2",
        "int8",
        False,
        "retry",
    )
    assert route_of("vhost.gateway.route.ps:grpc:tiny@int8.upstream_rq_time") is None
    assert route_of("cluster.tiny_int8.upstream_rq_total") is None


def test_limits_timeouts_tls_and_the_token(repository: Repository, tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    plan = _plan(repository, {}, token="s3cret", tls=(cert, key), max_streams=7)
    config = bootstrap(plan)
    (grpc,) = [x for x in config["static_resources"]["listeners"] if x["name"] == "grpc"]
    hcm = grpc["filter_chains"][0]["filters"][0]["typed_config"]
    assert hcm["http2_protocol_options"]["max_concurrent_streams"] == 7
    assert hcm["request_headers_timeout"] == "10.000s"
    host = hcm["route_config"]["virtual_hosts"][0]
    assert host["request_body_buffer_limit"] == 3_000_000
    tls = grpc["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["tls_certificates"][0]["certificate_chain"]["filename"] == str(cert)
    infer = _by_route_header(host["routes"], "v:tiny_fp32")[0]
    catalog = infer["metadata"]["filter_metadata"]["envoy.filters.http.lua"]["catalog"]
    assert catalog["token"] == "s3cret"
    assert set(catalog["variants"]) == {"tiny_fp32", "tiny_fp16", "tiny_int8"}
    assert set(catalog["models"]["tiny"]) == {"fp32", "fp16", "int8"}
    assert infer["route"]["max_stream_duration"] == {"grpc_timeout_header_max": "0s"}
    assert infer["route"]["timeout"] == "30.000s"


def test_the_binary_is_the_pinned_wheels() -> None:
    import subprocess

    version = subprocess.run(
        [str(envoy_binary()), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert "/1.40.0/" in version


def test_http_inference_is_routed_in_envoy_when_the_replicas_http_port_is_given(
    repository: Repository,
) -> None:
    config = bootstrap(_plan(repository, {}, triton_http_port=8000))
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    http = clusters["tiny_int8_http"]
    endpoint = http["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"]["port_value"] == 8000
    options = http["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert "http_protocol_options" in options["explicit_http_config"]  # Triton's HTTP/1.1
    routes = _routes(config, "http")
    (fp16,) = _by_route_header(routes, "hm:tiny:fp16")
    assert _chain(fp16) == ["tiny_fp16_http", "tiny_fp32_http"]
    infer = re.compile(fp16["match"]["safe_regex"]["regex"])  # (RE2 reads this pattern alike)
    for path, routed in (
        ("/v2/models/tiny/infer", True),
        ("/v2/models/tiny/versions/1/infer", True),  # the one version every model has
        ("/v2/models/tiny/versions/2/infer", False),  # the control plane: Triton's error
        ("/v2/models/tiny/ready", False),
    ):
        assert bool(infer.fullmatch(path)) is routed, path
    assert fp16["route"]["retry_policy"]["retriable_status_codes"] == [404, 503]
    assert routes[-1]["route"]["cluster"] == CONTROL_HTTP
    # without the port: HTTP inference goes to the control plane, as everything else on HTTP
    assert "tiny_int8_http" not in {
        c["name"] for c in bootstrap(_plan(repository, {}))["static_resources"]["clusters"]
    }


def test_workers_control_clusters_hold_every_worker_and_the_shadow_stays_with_the_first(
    repository: Repository, tmp_path: Path
) -> None:
    """``--workers 2`` with the Envoy front: one Envoy, its control clusters hold the first
    worker's loopback ports and the peer's; shadow samples go to the first worker alone (its
    token); the listeners share their ports with the supervisor's held reservation."""
    shadow = {"models": {"tiny": {"policy": "shadow", "precision": "int8"}}}
    plan = _plan(
        repository, shadow, triton_http_port=8000, control_peers=((40011, 40010),), reuse_port=True
    )
    config = bootstrap(plan)
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}

    def ports(name: str) -> list[int]:
        (group,) = clusters[name]["load_assignment"]["endpoints"]
        return [
            e["endpoint"]["address"]["socket_address"]["port_value"] for e in group["lb_endpoints"]
        ]

    assert ports(CONTROL_GRPC) == [40001, 40011] and ports(CONTROL_HTTP) == [40000, 40010]
    assert ports(CONTROL_SHADOW) == [40001] and ports(CONTROL_SHADOW + "_http") == [40000]
    listeners = config["static_resources"]["listeners"]
    assert [x.get("enable_reuse_port") for x in listeners] == [True, True]
    # a single gateway: one endpoint each, Envoy's own listener default
    single = bootstrap(_plan(repository, shadow, triton_http_port=8000))
    assert all("enable_reuse_port" not in x for x in single["static_resources"]["listeners"])
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    assert validate(path) == ""
