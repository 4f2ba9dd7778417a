"""``auto`` never treats a variant the builder marked over its accuracy budget as in budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.model_repository import load_manifests
from server.catalog import load_repository
from server.errors import ConfigError
from server.routing.policies import Router, parse_routing
from tests.server.conftest import copy_repository


def _mark(repo: Path, precision: str, **details: object) -> None:
    manifest = load_manifests(repo)["tiny"]
    manifest.variants[precision].details.update(details)
    manifest.save(repo)


def _auto(repo: Path, budget: float) -> str:
    doc = {"models": {"tiny": {"policy": "auto", "accuracy_budget": budget}}}
    return Router(load_repository(repo), parse_routing(doc)).decide("tiny").precision


@pytest.fixture
def repo(routing_repo: Path, tmp_path: Path) -> Path:
    # routing_repo: fp32 0.05 ms loss 0, fp16 0.08 ms loss 0, int8 0.03 ms loss 0.5
    return copy_repository(routing_repo, tmp_path / "repo")


def test_over_budget_variant_is_never_auto_chosen(repo: Path) -> None:
    assert _auto(repo, 1.0) == "int8"
    # Kept by --keep-over-budget: its recorded loss (0.5) is within the routing budget, but
    # the builder said its own budget was not met.
    _mark(repo, "int8", accuracy_budget=0.1, budget_met=False, budget_status="not met")
    assert _auto(repo, 1.0) == "fp32"


def test_met_budget_variant_stays_eligible(repo: Path) -> None:
    _mark(repo, "int8", accuracy_budget=1.0, budget_met=True)
    assert _auto(repo, 1.0) == "int8"


def test_only_over_budget_variants_is_a_config_error(repo: Path) -> None:
    for p in ("fp32", "fp16", "int8"):
        _mark(repo, p, budget_met=False)
    with pytest.raises(ConfigError, match="no variant within accuracy budget"):
        _auto(repo, 1.0)
