"""Routing on evidence: ``auto`` refuses quality figures measured on synthetic data unless the
routing file opts in (server/routing/evidence.py), and says why at start-up and in the index."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.model_repository import LABELLED, SYNTHETIC, UNLABELLED, Manifest, load_manifests
from server.app import GatewayServer, ServeOptions
from server.catalog import load_repository
from server.routing.evidence import quality_is_evidence
from server.routing.options import RoutingOptions
from server.routing.policies import ModelRoute, Router, parse_routing
from tests.helpers import skip_or_fail
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
    with caplog.at_level(logging.WARNING, logger="server.routing.policies"):
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
    from common.model_repository import ManifestError

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
    server = GatewayServer(ServeOptions(RoutingOptions(repo, routing=routing, retime="never")))
    rows = {name: reason for name, _, _, reason in server.gateway.index()}
    assert "synthetic" in rows["tiny"] and "serves fp32" in rows["tiny"]
    assert rows["tiny_int8"] == ""  # variant rows keep their own (readiness) reasons


# ---- re-timing on this host ---------------------------------------------------------------
OTHER_HOST = {
    "model": "Intel(R) Xeon(R) Platinum 8480+ (recorded elsewhere)",
    "machine": "x86_64",
    "cores": 224,
    "flags": ["amx_bf16", "amx_int8", "amx_tile", "avx2", "avx512_bf16", "avx512f"],
}
# What the other host "measured": fp16 fastest. On this host tiny_fp16 is made ~100x slower
# than the others (a heavy graph with the same interface), so its real rank is last.
RECORDED = {
    "fp16": {"latency_ms_p50": 0.01, "throughput": 90000.0, "batch_size": 8.0},
    "int8": {"latency_ms_p50": 0.03, "throughput": 40000.0, "batch_size": 8.0},
    "fp32": {"latency_ms_p50": 0.05, "throughput": 20000.0, "batch_size": 8.0},
}


def _heavy_onnx(path: Path, layers: int = 24, width: int = 384) -> None:
    """x [-1, 16] -> logits [-1, 4] through ``layers`` width x width MatMuls."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shapes = [(16, width), *[(width, width)] * layers, (width, 4)]
    inits, nodes, prev = [], [], "x"
    for i, shape in enumerate(shapes):
        w = (rng.normal(0, 1, shape) / np.sqrt(shape[0])).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = "logits" if i == len(shapes) - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [out]))
        prev = out
    graph = helper.make_graph(
        nodes,
        "heavy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


@pytest.fixture
def other_host_repo(repo: Path) -> Path:
    """``repo`` as if built on another CPU: host fields rewritten, recorded speeds swapped so
    that fp16 looks fastest, and tiny_fp16 really the slowest variant here."""
    _heavy_onnx(repo / "tiny_fp16" / "1" / "model.onnx")
    manifest = load_manifests(repo)["tiny"]
    manifest.host = dict(OTHER_HOST)
    for precision, v in manifest.variants.items():
        v.speed = dict(RECORDED[precision])
    manifest.save(repo)
    return repo


def _start(repo: Path, tmp_path: Path, retime: str) -> GatewayServer:
    routing = tmp_path / "routing.yaml"
    routing.write_text("models:\n  tiny:\n    policy: auto\n    accuracy_budget: 100\n")
    return GatewayServer(ServeOptions(RoutingOptions(repo, routing=routing, retime=retime)))


def _gauge(name: str, precision: str, source: str) -> float | None:
    from prometheus_client import REGISTRY

    labels = {"model": "tiny", "precision": precision, "source": source}
    return REGISTRY.get_sample_value(f"precision_serve_variant_{name}", labels)


def test_gateway_on_another_cpu_retimes_and_auto_follows_this_host(
    other_host_repo: Path, tmp_path: Path, caplog
) -> None:
    with caplog.at_level(logging.INFO, logger="server.routing.retime"):
        server = _start(other_host_repo, tmp_path, "auto")
    retimed = {p: _gauge("batch1_latency_seconds", p, "retimed") for p in ("fp32", "fp16", "int8")}
    assert all(v is not None and v > 0 for v in retimed.values())
    chosen = server.gateway.router.policies["tiny"].precision
    assert chosen == min(retimed, key=lambda p: retimed[p])  # this host's fastest, measured
    assert chosen != "fp16" and retimed["fp16"] > max(retimed["fp32"], retimed["int8"])
    # the manifest's figures are exported too, and the file is untouched
    assert _gauge("speed_rows_per_second", "fp16", "manifest") == RECORDED["fp16"]["throughput"]
    assert _gauge("speed_rows_per_second", "fp16", "retimed") < RECORDED["fp16"]["throughput"]
    assert load_manifests(other_host_repo)["tiny"].variants["fp16"].speed == RECORDED["fp16"]
    # one line says what changed: the host difference and the old vs new ranking
    (line,) = [r.getMessage() for r in caplog.records if r.name == "server.routing.retime"]
    assert "re-timed tiny" in line and "ranking changed from fp16 < int8 < fp32" in line
    assert "amx_int8" in line and "cores 224 -> " in line


def test_retime_never_ranks_by_the_manifest(other_host_repo: Path, tmp_path: Path) -> None:
    server = _start(other_host_repo, tmp_path, "never")
    assert server.gateway.router.policies["tiny"].precision == "fp16"


def test_same_host_is_not_retimed_unless_always(other_host_repo: Path, tmp_path: Path) -> None:
    from common.hostinfo import cpu_info

    manifest = load_manifests(other_host_repo)["tiny"]
    manifest.host = dict(cpu_info())
    manifest.save(other_host_repo)
    assert _start(other_host_repo, tmp_path, "auto").gateway.router.policies["tiny"].precision == (
        "fp16"
    )
    server = _start(other_host_repo, tmp_path, "always")
    assert server.gateway.router.policies["tiny"].precision != "fp16"


def test_triton_upstream_keeps_the_manifest_speeds(other_host_repo: Path, caplog) -> None:
    from server.routing.retime import retime_repository

    repository = load_repository(other_host_repo)
    with caplog.at_level(logging.WARNING, logger="server.routing.retime"):
        (result,) = retime_repository(repository, "auto", "triton://127.0.0.1:8001")
    assert not result.retimed and "triton" in result.why
    assert repository.models["tiny"].variants["fp16"].record.speed == RECORDED["fp16"]
    assert "runs the variants on its own hosts" in caplog.records[0].getMessage()


def _engine_gauge(precision: str, engine: str, source: str) -> float | None:
    from prometheus_client import REGISTRY

    labels = {"model": "tiny", "precision": precision, "engine": engine, "source": source}
    return REGISTRY.get_sample_value("precision_serve_variant_engine", labels)


def _fake_timer(per_round: dict[str, list[float]]):
    """A time_sessions stand-in: each session key's per-round throughputs as given."""

    def timer(sessions, samples, batch):
        assert set(sessions) == set(per_round)
        speeds = {
            key: {"latency_ms_p50": 1000.0 / sorted(v)[1], "throughput": sorted(v)[1],
                  "batch_size": float(batch)}
            for key, v in per_round.items()
        }  # fmt: skip
        return speeds, 3, per_round

    return timer


def test_busy_build_host_is_retimed_and_the_engine_rechecked(repo: Path, caplog) -> None:
    try:
        import openvino  # noqa: F401
    except ImportError:
        skip_or_fail("openvino is not installed")
    from common.hostinfo import cpu_info
    from server.routing.retime import retime_repository

    manifest = load_manifests(repo)["tiny"]
    here = dict(cpu_info())
    manifest.host = {**here, "load_average": 9.5, "busy": True}  # this host kind, but busy
    ov = {"options": {"inference_precision": "f32"}, "throughput": 1.0}
    for precision, v in manifest.variants.items():
        v.engine, v.engine_options = "onnxruntime", {}
        v.details["engine_timings"] = (
            {"onnxruntime": {"options": {}}, "openvino": ov} if precision != "fp16" else {}
        )
    manifest.save(repo)
    per_round = {
        "fp32": [100.0, 90.0, 110.0],  # 20 % spread
        "fp32@openvino": [105.0, 100.0, 110.0],  # +5 %: within the spread, stays
        "int8": [100.0, 90.0, 110.0],
        "int8@openvino": [200.0, 210.0, 190.0],  # +100 %: beyond it, moves
        "fp16": [50.0, 50.0, 50.0],  # nothing else timed by the builder: not re-checked
    }
    repository = load_repository(repo)
    with caplog.at_level(logging.INFO, logger="server.routing.retime"):
        (result,) = retime_repository(repository, "auto", timer=_fake_timer(per_round))
    assert f"the build host was busy (load average 9.50 over {here['cores']} cores)" in result.why
    variants = repository.models["tiny"].variants
    assert variants["int8"].record.engine == "openvino"
    assert variants["int8"].record.engine_options == {"inference_precision": "f32"}
    assert variants["int8"].record.speed["throughput"] == 200.0  # the moved engine's figures
    assert variants["fp32"].record.engine == "onnxruntime"
    assert variants["fp16"].record.engine == "onnxruntime" and "fp16" not in result.engines
    assert set(result.switched) == {"int8"}
    assert result.engines["fp32"]["verdict"] == "within noise"
    # exposed: the engine served in this process next to the manifest's
    assert _engine_gauge("int8", "openvino", "served") == 1.0
    assert _engine_gauge("int8", "onnxruntime", "manifest") == 1.0
    assert _engine_gauge("int8", "onnxruntime", "served") == 0.0
    assert _engine_gauge("fp32", "onnxruntime", "served") == 1.0
    (record,) = [r for r in caplog.records if r.name == "server.routing.retime"]
    assert record.levelno == logging.WARNING
    line = record.getMessage()
    assert (
        "int8 moved from onnxruntime to openvino in this process (openvino leads onnxruntime "
        "by +100% beyond the 20% spread)" in line
    )
    assert (
        "fp32 stays on onnxruntime (openvino leads onnxruntime by +5% within the 20% spread)"
        in (line)
    )
    # the manifest file is untouched
    assert load_manifests(repo)["tiny"].variants["int8"].engine == "onnxruntime"


def test_retime_mode_is_checked() -> None:
    from server.errors import ConfigError

    with pytest.raises(ConfigError, match="--retime must be one of auto, always, never"):
        ServeOptions(RoutingOptions(Path("."), retime="sometimes"))


@pytest.mark.integration
def test_cli_gateway_retimes_and_exports_both_figures(other_host_repo: Path, tmp_path: Path):
    """The real CLI path: ``precision-serve --retime auto`` (default) on a manifest from another
    CPU logs the new ranking, serves by it and exports both sets of figures on /metrics."""
    import urllib.request

    from server.runtime.runner import GatewayProcess

    routing = tmp_path / "routing.yaml"
    routing.write_text("models:\n  tiny:\n    policy: auto\n    accuracy_budget: 100\n")
    args = ["--routing", str(routing), "--log-level", "INFO"]
    with GatewayProcess(other_host_repo, extra_args=args) as gw:
        body = urllib.request.urlopen(gw.metrics_url, timeout=10).read().decode()
        log = gw.log()
    assert "re-timed tiny on this host" in log and "ranking changed from fp16" in log
    wanted = 'precision_serve_variant_batch1_latency_seconds{model="tiny",precision="fp16"'
    series = [line for line in body.splitlines() if line.startswith(wanted)]
    assert len(series) == 2
    assert any('source="manifest"' in line for line in series)
    assert any('source="retimed"' in line for line in series)
