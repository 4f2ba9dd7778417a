"""The slo policy through the Envoy front (server/front/slo.py, server/front/config.py): the
plan's runtime-weighted routes per rung, and Envoy's stats turned into the controller's windows.

The stats are real: tests/data/envoy/stats_{start,end}.json were captured from the pinned Envoy
by ``python -m tests.server.envoy_stats_capture`` (40 requests of ~5 ms on ``tiny_int8``, 2 of
~120 ms on ``tiny_fp32`` between the two readings, one more on ``tiny_fp32`` in flight at the
end)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from common.model_repository import SYNTHETIC, load_manifests
from server.catalog import Repository, load_repository
from server.front.config import (
    SLO_FLUSH_S,
    FrontPlan,
    bootstrap,
    plan_models,
    served_variants,
    triton_endpoints,
)
from server.front.slo import (
    ClusterStats,
    ModelWindows,
    bin_delta,
    combine,
    parse_stats,
    quantile_s,
    rung_clusters,
    window_inputs,
)
from server.front.supervisor import validate
from server.routing.policies import Router, parse_routing
from server.routing.slo import SloPolicy
from tests.server.conftest import copy_repository

DATA = Path(__file__).resolve().parents[1] / "data" / "envoy"
RUNGS = ("tiny_fp32", "tiny_int8")


def _document(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


def _router(repo: Path, slo: dict[str, Any], **route: Any) -> Router:
    routing = {"models": {"tiny": {"policy": "slo", "slo": slo, **route}}}
    return Router(load_repository(repo), parse_routing(routing))


def _plan(repository: Repository, router: Router) -> FrontPlan:
    variants = served_variants(repository)
    return FrontPlan(
        host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        control_grpc_port=40001,
        control_http_port=40000,
        triton=triton_endpoints("127.0.0.1:8001"),
        variants=variants,
        models=tuple(plan_models(repository, router, variants)),
        body_limit=3_000_000,
        max_streams=128,
        header_timeout_s=10.0,
        default_timeout_s=30.0,
    )


def _first_cluster(route: dict[str, Any]) -> str:
    """The cluster a route tries first (a plain route, or a fallback chain's first group)."""
    if "cluster" in route["route"]:
        return route["route"]["cluster"]
    spec = route["route"]["inline_cluster_specifier_plugin"]["extension"]["typed_config"]
    return spec["priority_groups"][0]["clusters"][0]["cluster_name"]


def test_an_slo_model_is_one_runtime_weighted_route_per_rung(
    routing_repo: Path, tmp_path: Path
) -> None:
    """routing_repo's ladder: fp32 -> int8 (fp16 is slower than fp32 there, so skipped)."""
    router = _router(routing_repo, {"p99_ms": 20})
    plan = _plan(load_repository(routing_repo), router)
    (model,) = plan.models
    assert model.slo and model.first == (("fp32", 1.0), ("int8", 0.0))
    assert rung_clusters(model) == ("tiny_fp32", "tiny_fp32_http", "tiny_int8", "tiny_int8_http")
    config = bootstrap(plan)
    listener = config["static_resources"]["listeners"][0]
    routes = listener["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
    policy = [
        r
        for r in routes["virtual_hosts"][0]["routes"]
        if r["match"].get("headers", [{}])[0].get("string_match") == {"exact": "m:tiny"}
    ]
    assert [_first_cluster(r) for r in policy] == ["tiny_fp32", "tiny_int8"]  # each its chain
    fraction = policy[0]["match"]["runtime_fraction"]
    assert fraction == {
        "default_value": {"numerator": 100, "denominator": "HUNDRED"},  # level 0: all fp32
        "runtime_key": "ps.split.tiny.0",
    }
    assert "runtime_fraction" not in policy[1]["match"]
    assert config["stats_flush_interval"] == f"{SLO_FLUSH_S:.3f}s"  # histograms merged often
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    assert validate(path) == ""

    # synthetic quality figures: slo serves the reference only: one plain route, no flush
    repo = copy_repository(routing_repo, tmp_path / "synthetic")
    manifest = load_manifests(repo)["tiny"]
    for variant in manifest.variants.values():
        variant.quality_source = SYNTHETIC
    manifest.save(repo)
    plan = _plan(load_repository(repo), _router(repo, {"p99_ms": 20}))
    (model,) = plan.models
    assert not model.slo and model.first == (("fp32", 1.0),)
    assert "stats_flush_interval" not in bootstrap(plan)


def test_envoys_stats_are_parsed_per_cluster() -> None:
    start, end = (parse_stats(_document(f"stats_{n}.json")) for n in ("start", "end"))
    assert set(end) == set(RUNGS)
    fast, slow = end["tiny_int8"], end["tiny_fp32"]
    assert (fast.total, fast.completed, fast.active) == (41, 41, 0)
    assert (slow.total, slow.completed, slow.active) == (4, 3, 1)  # the 2 s request in flight
    assert sum(fast.bins.values()) == 41 and sum(slow.bins.values()) == 3
    assert (start["tiny_int8"].completed, start["tiny_fp32"].completed) == (1, 1)
    # Envoy's detailed bins: (lower bound, width) in ms, about two significant digits
    assert all(0 < width <= max(1.0, lower / 5) for lower, width in slow.bins)


def test_a_window_of_the_mix_is_one_p99_over_every_rung() -> None:
    start, end = (parse_stats(_document(f"stats_{n}.json")) for n in ("start", "end"))
    inputs = window_inputs(combine(start, RUNGS), combine(end, RUNGS), elapsed_s=2.0)
    assert inputs is not None
    assert (inputs.requests, inputs.arrivals, inputs.inflight) == (42, 43, 1)
    # nearest rank of 42 values: the 42nd, one of the two ~120 ms requests (not int8's ~5 ms)
    assert 0.120 <= inputs.p99_s < 0.135
    alone = window_inputs(start["tiny_int8"], end["tiny_int8"], elapsed_s=2.0)
    assert alone is not None and 0.005 <= alone.p99_s < 0.012  # int8 alone
    # nothing new in the histograms yet (not merged): no window
    assert window_inputs(combine(end, RUNGS), combine(end, RUNGS), 2.0) is None


def test_bins_give_the_python_paths_nearest_rank_p99() -> None:
    """The Python path sorts the window's latencies and takes the ceil(0.99 n)-th; from
    one-millisecond bins the same value, within its bin."""
    latencies_ms = [3] * 150 + [7] * 40 + [12] * 8 + [40, 95]  # 200 values: the 198th is 12
    bins: dict[tuple[float, float], int] = {}
    for value in latencies_ms:
        bins[(float(value), 1.0)] = bins.get((float(value), 1.0), 0) + 1
    nearest = sorted(latencies_ms)[math.ceil(0.99 * len(latencies_ms)) - 1] / 1000
    assert nearest == 0.012
    assert nearest <= quantile_s(bins) <= nearest + 0.001
    assert quantile_s({}) is None
    assert bin_delta({(3.0, 1.0): 5, (7.0, 1.0): 2}, {(3.0, 1.0): 5}) == {(7.0, 1.0): 2}
    # the clusters of a mix add up bin by bin (a gRPC cluster and its HTTP twin, say)
    both = {
        "tiny_int8": ClusterStats(3, 3, 0, {(5.0, 0.1): 2, (9.0, 0.1): 1}),
        "tiny_int8_http": ClusterStats(2, 1, 1, {(5.0, 0.1): 1}),
    }
    assert combine(both, ["tiny_int8", "tiny_int8_http", "absent"]) == ClusterStats(
        5, 4, 1, {(5.0, 0.1): 3, (9.0, 0.1): 1}
    )


def _stats(total: int, completed: int, active: int, bins: dict) -> dict[str, ClusterStats]:
    return {"tiny_fp32": ClusterStats(total, completed, active, bins)}


def test_windows_from_envoys_stats_drive_the_same_controller(routing_repo: Path, caplog) -> None:
    """Readings every 0.25 s: windows close as on the Python path (``window_requests`` or
    ``window_ms``), feed SloController.close_window, and the shift lands in Envoy's keys."""
    caplog.set_level("INFO", logger="server.routing.slo")
    router = _router(
        routing_repo, {"p99_ms": 20, "window_ms": 500, "window_requests": 50, "up_windows": 1}
    )
    policy = router.policies["tiny"]
    assert isinstance(policy, SloPolicy)
    (model,) = _plan(load_repository(routing_repo), router).models
    windows = ModelWindows(model, policy, rung_clusters(model))
    assert windows.runtime({"fp32", "int8"}) == {"ps.split.tiny.0": 100}
    assert windows.step(_stats(0, 0, 0, {}), 0.0) is None  # first reading: opens
    assert windows.step(_stats(0, 0, 0, {}), 0.25) is None  # idle: still opening
    assert windows.opened == 0.25
    # 10 completions of ~30 ms and 30 in flight: not due (10 < 50, 0.25 s < 0.5 s)
    assert windows.step(_stats(40, 10, 30, {(30.0, 1.0): 10}), 0.5) is None
    # due at 0.5 s, but Envoy's histogram has not merged the latencies yet: wait
    assert windows.step(_stats(80, 20, 60, {}), 0.75) is None
    window = windows.step(_stats(120, 30, 90, {(30.0, 1.0): 10, (60.0, 1.0): 20}), 1.0)
    assert window is not None and window.requests == 30 and window.inflight == 90
    assert window.p99_s == pytest.approx(0.061)
    assert window.estimate_s == pytest.approx(90 * 0.75 / 30)  # Little: in flight / throughput
    assert window.action == "up" and policy.controller.level > 0
    assert "slo tiny: shift up" in caplog.text  # reported as on the Python path
    values = windows.runtime({"fp32", "int8"})
    assert values["ps.split.tiny.0"] == round(100 * policy.controller.shares()["fp32"]) < 100
    assert windows.runtime({"fp32"}) == {"ps.split.tiny.0": 100}  # int8 unready everywhere
    # Envoy restarted: its counters start again from 0; a new window opens
    assert windows.step(_stats(3, 1, 2, {(5.0, 1.0): 1}), 1.25) is None
    assert windows.start is not None and windows.start.total == 3 and windows.opened == 1.25


def test_requests_routed_by_the_control_plane_stop_feeding_it(routing_repo: Path) -> None:
    router = _router(routing_repo, {"p99_ms": 20, "window_requests": 1})
    policy = router.policies["tiny"]
    assert isinstance(policy, SloPolicy) and router.feedback("tiny") is not None
    policy.fed_elsewhere()
    assert router.feedback("tiny") is None
    router.decide("tiny")
    assert policy.controller.inflight == 0  # choose() no longer counts it
