"""Routing on evidence: ``auto`` refuses quality figures measured on synthetic data unless the
routing file opts in (server/evidence.py), and says why at start-up and in the index."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from server.app import GatewayServer, ServeOptions
from server.evidence import quality_is_evidence
from server.model_repository import LABELLED, SYNTHETIC, UNLABELLED, Manifest, load_manifests
from server.repository import load_repository
from server.routing import ModelRoute, Router, parse_routing
from tests.server.conftest import copy_repository


@pytest.fixture
def repo(routing_repo: Path, tmp_path: Path) -> Path:
    # routing_repo: fp32 0.05 ms loss 0, fp16 0.08 ms loss 0, int8 0.03 ms loss 0.5, labelled
    return copy_repository(routing_repo, tmp_path / "repo")


def _set_source(repo: Path, source: str | None, precisions: tuple[str, ...] = ("int8",)) -> None:
    manifest = load_manifests(repo)["tiny"]
    for p in precisions:
        manifest.variants[p].quality_source = source
    manifest.save(repo)


def _auto(repo: Path, **route: object) -> Router:
    doc = {"models": {"tiny": {"policy": "auto", **route}}}
    return Router(load_repository(repo), parse_routing(doc))


def test_auto_routes_on_labelled_figures(repo: Path) -> None:
    router = _auto(repo)
    assert router.decide("tiny").precision == "int8"
    assert router.policies["tiny"].reason == ""


def test_auto_refuses_synthetic_figures_and_serves_fp32(repo: Path, caplog) -> None:
    _set_source(repo, SYNTHETIC)
    with caplog.at_level(logging.WARNING, logger="server.routing"):
        router = _auto(repo)
    decision = router.decide("tiny")
    assert (decision.precision, decision.policy) == ("fp32", "auto")
    reason = router.policies["tiny"].reason
    assert "int8" in reason and "synthetic" in reason and "accept_synthetic_quality" in reason
    assert "fp16" not in reason  # fp16's figures are labelled: only int8 is named
    assert [r.getMessage() for r in caplog.records] == [f"routing: {reason}"]


def test_routing_file_opts_in_per_model_or_in_defaults(repo: Path) -> None:
    _set_source(repo, SYNTHETIC)
    assert _auto(repo, accept_synthetic_quality=True).decide("tiny").precision == "int8"
    doc = {"defaults": {"accept_synthetic_quality": True}, "models": {"tiny": {"policy": "auto"}}}
    router = Router(load_repository(repo), parse_routing(doc))
    assert router.decide("tiny").precision == "int8"
    assert "accept_synthetic_quality: true" in router.policies["tiny"].reason
    # the model's own setting wins over defaults
    doc["models"]["tiny"]["accept_synthetic_quality"] = False
    assert Router(load_repository(repo), parse_routing(doc)).decide("tiny").precision == "fp32"


def test_real_data_without_labels_is_evidence(repo: Path) -> None:
    _set_source(repo, UNLABELLED, ("fp16", "int8"))
    model = load_repository(repo).models["tiny"]
    assert quality_is_evidence(model, ModelRoute()) == (True, "")


def test_synthetic_reference_figures_are_not_a_reason_to_refuse(repo: Path) -> None:
    _set_source(repo, SYNTHETIC, ("fp32",))
    assert _auto(repo).decide("tiny").precision == "int8"


def test_a_wrong_provenance_value_is_a_manifest_error(repo: Path) -> None:
    from server.model_repository import ManifestError

    data = load_manifests(repo)["tiny"].to_dict()
    data["variants"]["int8"]["quality_source"] = "guesswork"
    with pytest.raises(ManifestError, match="quality_source"):
        Manifest.from_dict(data)


def _legacy(source: str, notes: list[str], accuracy: float | None) -> Manifest:
    variant = {
        "precision": "int8",
        "triton_name": "m_int8",
        "file": "m_int8/1/model.onnx",
        "quality": {"accuracy": accuracy, "top1_agreement": 0.99},
    }
    spec = {"name": "x", "dtype": "float32", "shape": [4]}
    return Manifest.from_dict(
        {
            "model": "m",
            "source": source,
            "task": "classification",
            "inputs": [spec],
            "outputs": [spec],
            "max_batch_size": 8,
            "notes": notes,
            "variants": {"int8": variant},
            "schema_version": 1,
        }
    )


@pytest.mark.parametrize(
    ("source", "notes", "accuracy", "want"),
    [
        ("onnx:/m.onnx", [], None, SYNTHETIC),  # onnx: could only be judged on noise
        ("resnet50", ["data: synthetic (seeded random noise): ..."], None, SYNTHETIC),
        ("torch:m:f", ["data: ... is measured on synthetic data (seeded ...)"], None, SYNTHETIC),
        ("digits", [], 0.98, LABELLED),
        ("minilm", ["calibration: 256 and evaluation: 200 sentences"], None, UNLABELLED),
    ],
)
def test_manifests_without_provenance_read_by_what_they_record(source, notes, accuracy, want):
    assert _legacy(source, notes, accuracy).quality_source("int8") == want


def test_index_and_start_up_log_say_why_auto_serves_fp32(repo: Path, tmp_path: Path) -> None:
    _set_source(repo, SYNTHETIC)
    routing = tmp_path / "routing.yaml"
    routing.write_text("models:\n  tiny:\n    policy: auto\n")
    server = GatewayServer(ServeOptions(repository=repo, routing=routing))
    rows = {name: reason for name, _, _, reason in server.gateway.index()}
    assert "synthetic" in rows["tiny"] and "serves fp32" in rows["tiny"]
    assert rows["tiny_int8"] == ""  # variant rows keep their own (readiness) reasons
