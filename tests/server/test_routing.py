"""Routing policies, the routing file and fallback candidates (unit level, no servers)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from server.catalog import load_repository
from server.errors import ConfigError, ModelNotFound
from server.routing.policies import Router, load_routing, parse_routing


def router(repo: Path, doc: dict | None = None) -> Router:
    return Router(load_repository(repo), parse_routing(doc or {}))


def test_defaults_fixed_on_most_accurate_and_fallback_chain(tiny_repository):
    r = router(tiny_repository)
    d = r.decide("tiny")
    assert (d.precision, d.policy, d.shadow_reference) == ("fp32", "fixed", None)
    assert r.candidates("tiny", "int8") == ["int8", "fp16", "fp32"]
    assert r.candidates("tiny", "fp16") == ["fp16", "fp32"]
    assert r.candidates("tiny", "fp32") == ["fp32"]


def test_request_precision_beats_policy_and_unknown_is_not_found(tiny_repository):
    r = router(tiny_repository, {"models": {"tiny": {"policy": "fixed", "precision": "fp16"}}})
    assert r.decide("tiny").precision == "fp16"
    d = r.decide("tiny", "INT8", source="header")
    assert (d.precision, d.policy) == ("int8", "header")
    with pytest.raises(ModelNotFound, match="fp8"):
        r.decide("tiny", "fp8")


def test_custom_fallback_chain(tiny_repository):
    r = router(tiny_repository, {"defaults": {"fallback": ["fp32", "fp16", "int8"]}})
    assert r.candidates("tiny", "fp32") == ["fp32", "fp16", "int8"]
    assert r.candidates("tiny", "int8") == ["int8"]


def test_auto_picks_fastest_within_budget(routing_repo):
    # routing_repo: fp32 0.05 ms loss 0, fp16 0.08 ms loss 0, int8 0.03 ms loss 0.5
    assert (
        router(routing_repo, {"models": {"tiny": {"policy": "auto"}}}).decide("tiny").precision
        == "int8"
    )
    strict = router(routing_repo, {"models": {"tiny": {"policy": "auto", "accuracy_budget": 0.1}}})
    d = strict.decide("tiny")
    assert (d.precision, d.policy) == ("fp32", "auto")
    assert strict.policies["tiny"].default_precision == "fp32"


def test_split_is_weighted_and_sticky_per_key(tiny_repository):
    r = router(
        tiny_repository,
        {"seed": 7, "models": {"tiny": {"policy": "split", "weights": {"fp32": 80, "int8": 20}}}},
    )
    counts = Counter(r.decide("tiny").precision for _ in range(2000))
    assert set(counts) == {"fp32", "int8"}
    assert 0.15 < counts["int8"] / 2000 < 0.25
    for key in ("alice", "bob", "carol"):
        assert len({r.decide("tiny", key=key).precision for _ in range(50)}) == 1
    keyed = Counter(r.decide("tiny", key=f"user-{i}").precision for i in range(2000))
    assert 0.15 < keyed["int8"] / 2000 < 0.25
    assert r.policies["tiny"].default_precision == "fp32"


def test_shadow_samples_a_fraction(tiny_repository):
    doc = {
        "seed": 1,
        "models": {"tiny": {"policy": "shadow", "precision": "int8", "shadow": {"fraction": 0.25}}},
    }
    r = router(tiny_repository, doc)
    decisions = [r.decide("tiny") for _ in range(2000)]
    assert {d.precision for d in decisions} == {"int8"}
    mirrored = sum(d.shadow_reference == "fp32" for d in decisions)
    assert 0.2 < mirrored / 2000 < 0.3


@pytest.mark.parametrize(
    ("doc", "needle"),
    [
        ({"models": {"other": {}}}, "unknown model(s): other"),
        ({"models": {"tiny": {"policy": "fastest"}}}, "unknown policy 'fastest'"),
        ({"models": {"tiny": {"precision": "fp8"}}}, "precision 'fp8' is not built"),
        ({"models": {"tiny": {"policy": "split", "weights": {"bf16": 1}}}}, "'bf16' is not built"),
        ({"models": {"tiny": {"policy": "split"}}}, "split needs positive weights"),
        ({"models": {"tiny": {"policy": "shadow", "shadow": {"fraction": 2}}}}, "fraction"),
        ({"models": {"tiny": {"colour": "red"}}}, "colour"),
        ({"models": {"tiny": {"policy": "auto", "accuracy_budget": -1}}}, "accuracy_budget"),
    ],
)
def test_bad_routing_files_name_the_problem(tiny_repository, doc, needle):
    with pytest.raises(ConfigError) as info:
        router(tiny_repository, doc)
    assert needle in info.value.message


def test_routing_yaml_file(tiny_repository, tmp_path):
    path = tmp_path / "routing.yaml"
    path.write_text(
        "models:\n  tiny:\n    policy: split\n    weights: {fp16: 1}\n    fallback: [fp16, fp32]\n"
    )
    r = Router(load_repository(tiny_repository), load_routing(path))
    assert r.decide("tiny").precision == "fp16"
    assert r.candidates("tiny", "fp16") == ["fp16", "fp32"]
    path.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_routing(path)
    with pytest.raises(ConfigError, match="cannot read routing file"):
        load_routing(tmp_path / "missing.yaml")
