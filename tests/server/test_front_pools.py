"""Precision pools through the Envoy front (server/front/pools.py, server/front/config.py): each
variant's clusters hold its pool's replicas, with the settings of that pool's own URL; variants
of a non-Triton pool stay with the control plane; what one Envoy cannot do is refused in one
line. The bootstrap is parsed back from JSON and accepted by ``envoy --mode validate``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from server.catalog import Repository, load_repository
from server.errors import ConfigError
from server.front.config import FrontPlan, bootstrap, plan_models, served_variants
from server.front.pools import PoolPlan, plan_pools
from server.front.supervisor import validate
from server.routing.policies import Router, parse_routing

CPU = "triton://10.0.0.1:8001,10.0.0.2:8001?http=8000&timeout_s=5"
GPU = "triton+dns://triton-gpu:9001?interval=2&http=9000"


@pytest.fixture(scope="module")
def repository(tiny_repository: Path) -> Repository:
    return load_repository(tiny_repository)


def _pools(repository: Repository, routing: dict[str, Any], upstream: str) -> PoolPlan:
    config = parse_routing(routing)
    return plan_pools(
        upstream,
        config.pools,
        config.pool_assignment(repository),
        served_variants(repository),
    )


def _plan(repository: Repository, routing: dict[str, Any], upstream: str = "embedded") -> FrontPlan:
    """As server/app.py makes it: only the Triton pools' variants, each to its replicas."""
    pools = _pools(repository, routing, upstream)
    router = Router(repository, parse_routing(routing))
    variants = {n: p for n, p in served_variants(repository).items() if n in pools.replicas}
    return FrontPlan(
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        control_grpc_port=40001,
        control_http_port=40000,
        triton=(),
        variants=variants,
        models=tuple(plan_models(repository, router, variants, pools.elsewhere)),
        body_limit=3_000_000,
        max_streams=128,
        header_timeout_s=10.0,
        default_timeout_s=30.0,
        pools=pools.replicas,
    )


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def _addresses(cluster: dict[str, Any]) -> list[tuple[str, int]]:
    (group,) = cluster["load_assignment"]["endpoints"]
    return [
        (a["address"], a["port_value"])
        for e in group["lb_endpoints"]
        for a in [e["endpoint"]["address"]["socket_address"]]
    ]


def _routes(config: dict[str, Any], listener: str = "grpc") -> dict[str, dict[str, Any]]:
    """route header value (``v:tiny_int8``, ``m:tiny:fp16``, ...) -> route."""
    (found,) = [x for x in config["static_resources"]["listeners"] if x["name"] == listener]
    hcm = found["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    return {h["string_match"]["exact"]: r for r in routes for h in r["match"].get("headers", [])}


def _chain(route: dict[str, Any]) -> list[str]:
    if "cluster" in route["route"]:
        return [route["route"]["cluster"]]
    spec = route["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"]
    return [g["clusters"][0]["cluster_name"] for g in spec["priority_groups"]]


TWO_POOLS = {
    "pools": {"cpu": CPU, "gpu": GPU},
    "models": {
        "tiny": {
            "precision": "int8",
            "precision_pools": {"int8": "cpu", "fp32": "cpu", "fp16": "gpu"},
        }
    },
}


def test_each_variant_goes_to_its_pools_replicas_with_that_urls_settings(
    repository: Repository,
) -> None:
    pools = _pools(repository, TWO_POOLS, "embedded")
    cpu, gpu = pools.replicas["tiny_int8"], pools.replicas["tiny_fp16"]
    assert pools.replicas == {"tiny_int8": cpu, "tiny_fp32": cpu, "tiny_fp16": gpu}
    assert [(x.host, x.port) for x in cpu.endpoints] == [("10.0.0.1", 8001), ("10.0.0.2", 8001)]
    assert (cpu.dns, cpu.http_port, cpu.timeout_s) == (False, 8000, 5.0)
    assert (gpu.dns, gpu.resolve_interval_s, gpu.http_port, gpu.timeout_s) == (
        True,
        2.0,
        9000,
        30.0,
    )
    assert [(x.host, x.port) for x in gpu.endpoints] == [("triton-gpu", 9001)]
    assert pools.front == "auto" and pools.elsewhere == frozenset()

    config = json.loads(json.dumps(bootstrap(_plan(repository, TWO_POOLS))))
    clusters = _clusters(config)
    # gRPC: the CPU pool's static list, the GPU pool's name re-resolved at its own interval
    assert clusters["tiny_int8"]["type"] == "STATIC"
    assert _addresses(clusters["tiny_int8"]) == [("10.0.0.1", 8001), ("10.0.0.2", 8001)]
    assert _addresses(clusters["tiny_fp32"]) == _addresses(clusters["tiny_int8"])
    assert clusters["tiny_fp16"]["type"] == "STRICT_DNS"
    assert clusters["tiny_fp16"]["dns_refresh_rate"] == "2.000s"
    assert clusters["tiny_fp16"]["dns_lookup_family"] == "ALL"  # A and AAAA: every address
    assert _addresses(clusters["tiny_fp16"]) == [("triton-gpu", 9001)]
    # HTTP: each pool's own HTTP port
    assert _addresses(clusters["tiny_int8_http"]) == [("10.0.0.1", 8000), ("10.0.0.2", 8000)]
    assert _addresses(clusters["tiny_fp16_http"]) == [("triton-gpu", 9000)]

    routes = _routes(config)
    # a chain crosses the pools; each precision tried twice (its pool has several replicas)
    assert _chain(routes["m:tiny"]) == ["tiny_int8"] * 2 + ["tiny_fp16"] * 2 + ["tiny_fp32"] * 2
    # the deadline without grpc-timeout: the pool's own, the longest a chain crosses
    assert routes["v:tiny_int8"]["route"]["timeout"] == "5.000s"
    assert routes["v:tiny_fp16"]["route"]["timeout"] == "30.000s"
    assert routes["m:tiny:fp32"]["route"]["timeout"] == "5.000s"
    assert routes["m:tiny"]["route"]["timeout"] == "30.000s"
    assert "hm:tiny:fp16" in _routes(config, "http")


def test_the_bootstrap_with_pools_is_accepted_by_envoy(
    repository: Repository, tmp_path: Path
) -> None:
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(bootstrap(_plan(repository, TWO_POOLS))))
    assert validate(path) == ""


def test_an_embedded_pool_stays_with_the_control_plane(repository: Repository) -> None:
    """fp32 goes to the embedded --upstream: no cluster, not in select.lua's catalog, and a
    fallback chain that reaches it is the control plane's (Python falls back into it)."""
    routing = {
        "pools": {"cpu": "triton://10.0.0.1:8001", "gpu": "triton://10.0.0.3:8001"},
        "models": {
            "tiny": {
                "precision": "int8",
                "fallback": ["int8", "fp16"],
                "precision_pools": {"int8": "cpu", "fp16": "gpu"},
            }
        },
    }
    pools = _pools(repository, routing, "embedded")
    assert pools.elsewhere == frozenset({"tiny_fp32"})
    config = bootstrap(_plan(repository, routing))
    assert set(_clusters(config)) == {"tiny_int8", "tiny_fp16", "control_grpc", "control_http"}
    routes = _routes(config)
    assert _chain(routes["m:tiny"]) == ["tiny_int8", "tiny_fp16"]
    assert _chain(routes["m:tiny:fp16"]) == ["tiny_fp16"]
    assert "m:tiny:fp32" not in routes and "v:tiny_fp32" not in routes
    catalog = routes["m:tiny"]["metadata"]["filter_metadata"]["envoy.filters.http.lua"]["catalog"]
    assert set(catalog["variants"]) == {"tiny_int8", "tiny_fp16"}
    assert set(catalog["models"]["tiny"]) == {"int8", "fp16"}

    # the default fallback (int8 -> fp16 -> fp32) reaches fp32 from every precision: the model's
    # routes are all the control plane's; its Triton variants by name stay in Envoy
    default = {**routing, "models": {"tiny": {**routing["models"]["tiny"], "fallback": None}}}
    routes = _routes(bootstrap(_plan(repository, default)))
    assert not [key for key in routes if key.startswith("m:")]
    assert {"v:tiny_int8", "v:tiny_fp16"} <= set(routes)


def test_what_one_envoy_cannot_do_is_refused_in_one_line(repository: Repository) -> None:
    mixed_front = {**TWO_POOLS, "pools": {"cpu": CPU + "&front=python", "gpu": GPU}}
    with pytest.raises(ConfigError) as front:
        _pools(repository, mixed_front, "embedded")
    message = str(front.value)
    assert "front=auto (gpu)" in message and "front=python (cpu)" in message
    assert "\n" not in message
    # the --upstream counts too when it is a Triton URL
    with pytest.raises(ConfigError, match=r"front=python \(--upstream\)"):
        _pools(repository, TWO_POOLS, "triton://10.0.0.9:8001?front=python")

    no_http = {**TWO_POOLS, "pools": {"cpu": CPU, "gpu": "triton://10.0.0.3:8001"}}
    with pytest.raises(ConfigError) as http:
        _pools(repository, no_http, "embedded")
    assert "?http= on cpu, not on gpu" in str(http.value) and "\n" not in str(http.value)

    # every pool on the Python front: no Envoy; no Triton at all: no front to choose
    python = {**TWO_POOLS, "pools": {"cpu": CPU + "&front=python", "gpu": GPU + "&front=python"}}
    assert _pools(repository, python, "embedded").front == "python"
    embedded = {**TWO_POOLS, "pools": {"cpu": "embedded", "gpu": "embedded"}}
    assert _pools(repository, embedded, "embedded") == PoolPlan(
        "", {}, frozenset({"tiny_int8", "tiny_fp16", "tiny_fp32"})
    )
