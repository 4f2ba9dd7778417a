"""The ``slo`` policy: its controller fed synthetic observations (no wall clock, no servers),
the routing file block, the exported metrics, and one end-to-end check through a gateway."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client import REGISTRY

from server.app import ServeOptions
from server.catalog import load_repository
from server.errors import ConfigError
from server.routing.options import RoutingOptions
from server.routing.policies import Router, parse_routing
from server.routing.slo import Rung, SloController, ceiling, ladder
from server.routing.slo_config import SloSettings
from server.runtime.runner import InProcessGateway
from server.transports.options import ListenOptions, Ports
from tests.server.conftest import rows

OBJECTIVE = 0.050
RUNGS = [Rung("fp32", 0.0, 30.0), Rung("fp16", 0.0, 25.0), Rung("int8-dynamic", 0.8, 20.0)]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def controller(budget: float = 1.0, **kw) -> tuple[SloController, Clock]:
    kw.setdefault("feed_forward", False)  # the feedback path alone; feed-forward: below
    clock = Clock()
    settings = SloSettings(p99_s=OBJECTIVE, window_requests=10, window_s=1.0, **kw)
    return SloController(RUNGS, settings, budget, clock), clock


def window(c: SloController, clock: Clock, latency_s: float, n: int = 10) -> str:
    """One window of ``n`` completions, each ``latency_s``; the controller's action."""
    result = None
    for _ in range(n):
        c.started()
        clock.now += 0.01
        result = c.observe(latency_s) or result
    assert result is not None
    return result.action


def test_hysteresis_needs_consecutive_hot_windows_and_holds_in_the_band():
    c, clock = controller()
    assert window(c, clock, 0.047) == "hold"  # hot (> 0.9 x objective) once: not yet
    assert window(c, clock, 0.040) == "hold"  # in the band: the count starts again
    assert window(c, clock, 0.047) == "hold"
    assert c.level == 0.0
    assert window(c, clock, 0.047) == "up"  # second consecutive hot window
    moved = 0.1 * (0.94 / 0.9) ** 2  # step x (estimate / hot threshold)^2: just over a step
    assert c.level == pytest.approx(moved)
    for _ in range(20):  # between 0.6 and 0.9 x objective: never moves
        assert window(c, clock, 0.040) == "hold"
    assert c.level == pytest.approx(moved)
    assert c.shares() == pytest.approx({"fp32": 1 - moved, "fp16": moved, "int8-dynamic": 0.0})


def test_the_move_grows_with_the_overload():
    c, clock = controller()
    window(c, clock, 0.06)  # 1.2 x objective: under fast_shift_above, so two windows
    assert window(c, clock, 0.06) == "up"
    assert c.level == pytest.approx(0.1 * (1.2 / 0.9) ** 2)


def test_far_over_the_objective_shifts_a_whole_rung_after_one_window():
    c, clock = controller()
    assert window(c, clock, 0.08) == "up"  # 1.6 x objective: over fast_shift_above, at once
    assert c.level == pytest.approx(0.1 * (1.6 / 0.9) ** 2)
    c, clock = controller()
    assert window(c, clock, 0.2) == "up"  # 4 x: the move is capped at one rung per window
    assert c.level == pytest.approx(1.0)
    assert window(c, clock, 0.2) == "up"
    assert c.level == pytest.approx(2.0)


@pytest.mark.parametrize("feed_forward", [False, True])
def test_budget_caps_the_mix_even_under_overload(feed_forward):
    c, clock = controller(budget=0.5, feed_forward=feed_forward)
    assert c.max_level == pytest.approx(1 + 0.5 / 0.8)
    for _ in range(100):
        window(c, clock, 1.0)
        assert c.expected_loss() <= 0.5 + 1e-9
    assert c.level == pytest.approx(c.max_level)
    shares = c.shares()
    assert shares["fp32"] == 0.0
    assert shares["int8-dynamic"] == pytest.approx(0.625)
    assert c.expected_loss() == pytest.approx(0.5)


def test_moves_back_as_load_falls():
    c, clock = controller()
    for _ in range(10):
        window(c, clock, 0.06)
    high = c.level
    assert high >= 0.5
    actions = [window(c, clock, 0.020) for _ in range(60)]  # cool: one step per 3 windows
    assert c.level == 0.0
    assert actions.count("down") == round(high / 0.1)
    assert "up" not in actions
    assert c.shares()["fp32"] == 1.0


def test_a_deep_fall_in_load_moves_back_two_steps_at_a_time():
    c, clock = controller()
    for _ in range(10):
        window(c, clock, 0.06)
    high = c.level
    actions = [window(c, clock, 0.010) for _ in range(60)]  # under 0.3 x objective
    assert c.level == 0.0
    assert actions.count("down") == math.ceil(round(high / 0.2, 6))  # 0.5: 0.2 + 0.2 + 0.1


def test_windows_are_driven_by_completions_not_a_timer():
    c, clock = controller()
    clock.now += 3600  # an hour passes with no request: no decision, no change
    assert c.windows == 0
    c.started()  # the first window opens with the first request, not at start-up
    assert c.observe(0.2) is None
    c.started()
    clock.now += 1.0
    w = c.observe(0.2)  # the first completion after window_s closes the window
    assert w is not None and w.requests == 2 and w.p99_s == 0.2
    assert w.rate == 2.0  # arrivals over the window, not over the hour before it
    c.started()
    assert c.observe(0.2) is None  # a fresh window: neither 10 completions nor 1 s yet
    for _ in range(9):
        c.started()
        w = c.observe(0.2) or w
    assert c.windows == 2  # ten completions closed it with no time passing


def test_in_flight_backlog_raises_the_estimate_before_latencies_do():
    c, clock = controller()
    for _ in range(200):  # a burst arrives: 200 in flight
        c.started()
    result = None
    for _ in range(10):  # the first ten finish fast, but 190 are still queued behind them
        clock.now += 0.001
        result = c.observe(0.005) or result
    assert result is not None
    assert result.p99_s == 0.005
    assert result.inflight == 190
    assert result.estimate_s == pytest.approx(190 * 0.010 / 10)  # in flight / throughput
    assert result.estimate_s > OBJECTIVE


def test_failed_fast_requests_do_not_count_as_latency():
    c, clock = controller()
    c.started()
    clock.now += 10  # the window is due: only a counted completion closes it
    assert c.observe(0.0001, counts=False) is None
    assert c.inflight == 0 and c.windows == 0


def plant_latency(level: float, load: float, rng: random.Random) -> float:
    """A synthetic server: capacity grows with the level; latency explodes near saturation."""
    capacity = 100.0 * (1 + 0.2 * level)  # requests/s
    rho = min(load / capacity, 0.99)
    service = 1 / capacity
    return service / (1 - rho) * 3 * rng.uniform(0.8, 1.2)


def reversals(actions: list[str]) -> int:
    moves = [a for a in actions if a != "hold"]
    return sum(1 for a, b in itertools.pairwise(moves) if a != b)


@pytest.mark.parametrize("load", [60.0, 100.0, 115.0, 130.0])
def test_no_flapping_at_steady_load(load):
    c, clock = controller()
    rng = random.Random(1)
    actions = []
    for _ in range(400):
        actions.append(window(c, clock, plant_latency(c.level, load, rng)))
    settled = actions[100:]
    assert reversals(settled) <= 2, (load, c.level, settled)
    assert c.expected_loss() <= 1.0


def test_a_load_between_two_levels_backs_off_instead_of_flapping():
    # level 0 is hot, level 0.1 is cool: without back-off it would spend 2 of every 5 windows
    # on the hot level (3 cool windows, shift back, 2 hot windows, shift up, ...)
    c, clock = controller()
    hot = []
    for _ in range(600):
        hot.append(c.level < 0.05)
        window(c, clock, 0.047 if hot[-1] else 0.025)
    assert c.down_needed == 3 * 16  # backed off to the cap
    assert sum(hot[-300:]) / 300 < 0.06  # hot at most every ~50 windows, for 2 windows
    assert sum(hot[:30]) / 30 > 0.2  # while it was still learning


def test_back_off_relaxes_once_shifts_back_hold():
    c, clock = controller()
    for _ in range(40):  # flap a while: back-off grows
        window(c, clock, 0.047 if c.level < 0.05 else 0.025)
    for _ in range(5):
        window(c, clock, 0.2)  # then real load: well up the ladder
    backed_off = c.down_needed
    assert backed_off > 3
    for _ in range(400):  # and a real fall: each shift back holds, back-off halves each time
        window(c, clock, 0.005)
        if c.level == 0.0:
            break
    assert c.level == 0.0
    assert c.down_needed < backed_off


def paced(c: SloController, clock: Clock, latency_s: float, rate: float, n: int = 10) -> str:
    """One window of ``n`` requests arriving (and ending) ``rate`` per second; the action."""
    result = None
    for _ in range(n):
        c.started()
        clock.now += 1.0 / rate
        result = c.observe(latency_s) or result
    assert result is not None
    return result.action


def test_feed_forward_jumps_to_a_level_whose_capacity_covers_the_rate():
    c, clock = controller(feed_forward=True)
    assert paced(c, clock, 0.047, rate=100) == "hold"  # hot once: the hysteresis still holds
    assert c.limit is None and c.level == 0.0
    assert paced(c, clock, 0.047, rate=100) == "up"
    # fp32 failed at 100 req/s: the level must carry 100 x headroom 1.1; the proportional term
    # alone would have moved 0.1 x (0.94 / 0.9)^2 = 0.11
    assert c.limit == pytest.approx(100)
    assert c.speedup() * c.limit == pytest.approx(100 * 1.1)
    assert c.level == pytest.approx((30 - 30 / 1.1) / (30 - 25))
    paced(c, clock, 0.047, rate=120)
    assert paced(c, clock, 0.047, rate=120) == "up"  # the rate rose: further, past fp16
    assert c.level > 1.0
    assert c.speedup() * c.limit == pytest.approx(c.last.rate * 1.1)


def test_feed_forward_blocks_shifting_back_while_the_rate_still_needs_the_level():
    c, clock = controller(feed_forward=True)
    for _ in range(2):
        paced(c, clock, 0.047, rate=100)
    high, limit = c.level, c.limit
    actions = [paced(c, clock, 0.010, rate=100) for _ in range(3)]  # cool, same rate
    assert actions == ["hold"] * 3 and c.level == high  # a shift back was due, but blocked
    assert c.limit == pytest.approx(limit * 1.05)  # ... and the evidence fades a little
    actions = [paced(c, clock, 0.010, rate=40) for _ in range(30)]  # the load falls
    assert "down" in actions and c.level == 0.0


def test_feed_forward_needs_speeds_for_every_rung():
    c = SloController(
        [Rung("fp32", 0.0, None), Rung("int8", 0.5, 20.0)], SloSettings(p99_s=0.05), 1.0
    )
    assert c.speedup() is None and c.needed_level(1000.0) == 0.0


def test_ladder_skips_a_marginally_faster_rung(routing_repo):
    model = load_repository(routing_repo).models["tiny"]
    # fp32 0.05 ms; fp16 made 1.11x faster, lossless; int8 0.03 ms (1.67x), loss 0.5
    model.variants["fp16"].record.speed["latency_ms_p50"] = 0.045
    assert [r.precision for r in ladder(model)] == ["fp32", "int8"]  # min_speedup 1.15
    assert [r.precision for r in ladder(model, min_speedup=1.0)] == ["fp32", "fp16", "int8"]
    assert [r.precision for r in ladder(model, min_speedup=2.0)] == ["fp32"]


def test_ceiling_and_ladder_respect_budget_and_speed(routing_repo):
    assert ceiling(RUNGS, 2.0) == 2.0
    assert ceiling(RUNGS, 0.0) == 1.0  # fp16 is lossless; int8-dynamic gets no share
    # routing_repo: fp32 0.05 ms loss 0, fp16 0.08 ms (slower: skipped), int8 0.03 ms loss 0.5
    rungs = ladder(load_repository(routing_repo).models["tiny"])
    assert [r.precision for r in rungs] == ["fp32", "int8"]
    with pytest.raises(ValueError, match="over the accuracy budget"):
        SloController([Rung("int8", 0.5, 1.0)], SloSettings(p99_s=0.05), 0.1)


def router(repo: Path, slo: dict | None, **model) -> Router:
    doc = {"seed": 5, "models": {"tiny": {"policy": "slo", **model}}}
    if slo is not None:
        doc["models"]["tiny"]["slo"] = slo
    return Router(load_repository(repo), parse_routing(doc))


def gauge(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_routing_file_errors_name_the_field(routing_repo):
    with pytest.raises(ConfigError, match="needs slo"):
        router(routing_repo, None)
    with pytest.raises(ConfigError, match=r"slo\.p99_ms: Field required"):
        router(routing_repo, {"window_requests": 5})
    with pytest.raises(ConfigError, match=r"slo\.p99_msec: Extra inputs"):
        router(routing_repo, {"p99_ms": 5, "p99_msec": 5})
    with pytest.raises(ConfigError, match="hysteresis"):
        router(routing_repo, {"p99_ms": 5, "shift_up_above": 0.5, "shift_down_below": 0.7})
    with pytest.raises(ConfigError, match=r"fast_shift_above \(0.8\) must be at least"):
        router(routing_repo, {"p99_ms": 5, "fast_shift_above": 0.8})
    with pytest.raises(ConfigError, match=r"slo\.min_speedup: Input should be greater"):
        router(routing_repo, {"p99_ms": 5, "min_speedup": 0.9})
    with pytest.raises(ConfigError, match="over the accuracy budget"):
        repo = load_repository(routing_repo)
        for variant in repo.models["tiny"].variants.values():
            variant.record.details["accuracy_loss"] = 2.0
        Router(repo, parse_routing({"models": {"tiny": {"policy": "slo", "slo": {"p99_ms": 5}}}}))


def test_policy_routes_by_the_mix_and_exports_it(routing_repo, caplog):
    caplog.set_level("INFO", logger="server.routing.slo")
    r = router(routing_repo, {"p99_ms": 20, "accuracy_budget": 0.25, "window_requests": 5})
    policy = r.policies["tiny"]
    assert policy.default_precision == "fp32"
    assert gauge("precision_serve_slo_objective_seconds", model="tiny") == pytest.approx(0.02)
    assert gauge("precision_serve_slo_share", model="tiny", precision="fp32") == 1.0
    observe = r.feedback("tiny")
    assert observe is not None
    for _ in range(100):  # every window far over the objective: up to the budget's ceiling
        d = r.decide("tiny")
        observe(d.precision, 1.0, True)
    assert policy.controller.level == pytest.approx(0.5)  # int8 loss 0.5, budget 0.25
    assert gauge("precision_serve_slo_share", model="tiny", precision="int8") == pytest.approx(0.5)
    assert gauge("precision_serve_slo_expected_accuracy_loss", model="tiny") == pytest.approx(0.25)
    assert gauge("precision_serve_slo_shifts_total", model="tiny", direction="up") >= 1
    assert "slo tiny: shift up to level 0.50 (fp32 50%, int8 50%)" in caplog.text  # each shift
    counts = Counter(r.decide("tiny").precision for _ in range(2000))
    assert 0.4 < counts["int8"] / 2000 < 0.6
    assert r.routes["tiny"].accuracy_budget is None  # slo's own budget was used
    fixed = Router(load_repository(routing_repo), parse_routing({}))
    assert fixed.feedback("tiny") is None  # fixed policies get no feedback


@pytest.mark.integration
def test_gateway_feeds_the_controller_and_responses_name_the_precision(routing_repo, tmp_path):
    routing = tmp_path / "routing.yaml"
    routing.write_text(
        "models:\n  tiny:\n    policy: slo\n"
        "    slo: {p99_ms: 0.001, window_requests: 5, up_windows: 1, step: 0.5}\n"
    )
    options = ServeOptions(
        RoutingOptions(routing_repo, routing=routing), listen=ListenOptions(ports=Ports(0, 0, 0))
    )
    with InProcessGateway(options) as gw:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        x = rows(1)
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        served = []
        for _ in range(40):  # every request is over a 1 us objective: the mix moves to int8
            result = client.infer("tiny", [inp])
            served.append(result.get_response().parameters["precision"].string_param)
        asked = client.infer("tiny", [inp], parameters={"precision": "fp32"})
        client.close()
    assert served[0] == "fp32"
    assert served[-10:] == ["int8"] * 10
    assert asked.get_response().parameters["precision"].string_param == "fp32"
    assert np.isfinite(asked.as_numpy("logits")).all()


def test_slo_never_shifts_on_synthetic_quality_unless_the_route_accepts_it(routing_repo, tmp_path):
    """Quality figures measured on noise are not evidence (server/routing/evidence.py): slo then
    serves the reference only and says why; ``accept_synthetic_quality: true`` lets it shift."""
    from common.model_repository import SYNTHETIC, load_manifests
    from tests.server.conftest import copy_repository

    repo = copy_repository(routing_repo, tmp_path / "repo")
    manifest = load_manifests(repo)["tiny"]
    for v in manifest.variants.values():
        v.quality_source = SYNTHETIC
    manifest.save(repo)
    slo = {"p99_ms": 20, "accuracy_budget": 0.25, "window_requests": 5}
    for accept, shifts in ((False, False), (True, True)):
        r = router(repo, slo, accept_synthetic_quality=accept)
        policy = r.policies["tiny"]
        assert ("synthetic" in policy.reason) and (("not evidence" in policy.reason) != accept)
        observe = r.feedback("tiny")
        for _ in range(100):  # every window far over the objective
            d = r.decide("tiny")
            observe(d.precision, 1.0, True)
        served = {r.decide("tiny").precision for _ in range(200)}
        assert (served != {"fp32"}) == shifts, (accept, served)
