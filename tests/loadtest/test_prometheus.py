"""Every PromQL expression of the Grafana dashboard returns data from a real Prometheus server.

Prometheus (Debian's binary) runs on loopback with deploy/prometheus/prometheus.yml's jobs
pointed at live servers, scraping every second:
- the gateway panels: a gateway on a copy of the tiny repository whose int8 file is broken (so
  int8 requests fall back), with a shadow policy (so shadow comparisons happen), under a Locust
  run (the project's locustfile) plus a thread sending policy-routed, int8 and malformed
  requests (errors);
- the Triton panels (``nv_inference_*``): a real Triton (tests/triton's launcher) serving the
  tiny repository, under direct load;
- the Envoy front's panels (``precision_serve_envoy_*`` and the shadow panels): a gateway with
  the Envoy front in front of a real Triton whose int8 is unloaded, with a shadow policy (Envoy
  mirrors every request to the control plane, which compares), under direct load;
- the LLM panels (``precision_serve_llm_*``): a gateway serving the tiny random Llama (the suite's
  LLM), under the project's streaming Locust user (loadtest/locustfile_llm.py) at fp32 plus a
  thread streaming int4.
Grafana's ``$__rate_interval`` becomes 10s and ``$model`` its "All" value.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

from common import process
from common.model_repository import load_manifests
from loadtest.runner import Step, StepSettings, locust_command
from server.runtime.runner import GatewayProcess
from tests.loadtest.promserver import ROOT, PrometheusServer, config_from_deploy

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "precision-serve.json"
RATE_INTERVAL = "10s"
DEADLINE_S = 45.0


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def concrete(expr: str) -> str:
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace("$model", ".*")


def is_triton(expr: str) -> bool:
    return "nv_inference_" in expr


def is_llm(expr: str) -> bool:
    return "precision_serve_llm_" in expr


def reads_envoy(expr: str) -> bool:
    """A panel that also reads the Envoy front's series (docs/envoy.md)."""
    return "precision_serve_envoy_" in expr


def _infer(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray, **kw) -> None:  # type: ignore[no-untyped-def]
    t = grpcclient.InferInput("x", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    client.infer(model, [t], client_timeout=10, **kw)


def _background(stop: threading.Event, work: Callable[[], None]) -> threading.Thread:
    def loop() -> None:
        while not stop.is_set():
            work()
            time.sleep(0.02)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


def _data_under_load(
    prom: PrometheusServer, exprs: list[str], work: Callable[[], None], close: Callable[[], None]
) -> tuple[dict[str, str], dict[str, str]]:
    """Run ``work`` in a loop while waiting for every expression's data; then stop, ``close()``.
    Returns (expressions still without data, Prometheus's target health by job)."""
    stop = threading.Event()
    thread = _background(stop, work)
    try:
        return _wait_for_data(prom, exprs), prom.targets_up()
    finally:
        stop.set()
        thread.join(15)
        close()


def _wait_for_data(prom: PrometheusServer, exprs: list[str]) -> dict[str, str]:
    """Query until every expression has a result; returns the ones still empty (with why)."""
    pending = {e: "no data" for e in exprs}
    deadline = time.monotonic() + DEADLINE_S
    while pending and time.monotonic() < deadline:
        for expr in list(pending):
            result = prom.query(concrete(expr))
            if result:
                del pending[expr]
        time.sleep(1.0)
    return pending


def test_dashboard_gateway_queries_return_data(
    tiny_repository: Path, tmp_path: Path, prometheus_binary: str
) -> None:
    repo = shutil.copytree(tiny_repository, tmp_path / "repo")
    manifest = load_manifests(repo)["tiny"]
    (repo / manifest.variants["int8"].file).write_bytes(b"not an onnx model")  # -> fallback
    routing = tmp_path / "routing.yaml"
    routing.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "models": {
                    "tiny": {
                        "policy": "shadow",
                        "precision": "fp16",
                        "shadow": {"reference": "fp32", "fraction": 1.0},
                    }
                },
            }
        )
    )
    exprs = [e for e in dashboard_exprs() if not is_triton(e) and not is_llm(e)]
    x = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)
    bad = np.zeros((1, 7), np.float32)  # wrong shape -> INVALID_ARGUMENT, counted as an error

    with GatewayProcess(repo, ["--routing", str(routing)]) as gw:
        metrics = gw.metrics_url.removeprefix("http://").removesuffix("/metrics")
        config = config_from_deploy({"precision-serve": metrics})
        with PrometheusServer(prometheus_binary, config, tmp_path / "prometheus") as prom:
            settings = StepSettings(
                model="tiny", target=gw.grpc_url, repository=repo, duration_s=30, warmup_s=0
            )
            cmd = locust_command(
                Step("fp32", 2, 1), settings, 30, tmp_path / "locust", tmp_path / "rec.npz"
            )
            locust = process.start(cmd, log_path=tmp_path / "locust.log")
            client = grpcclient.InferenceServerClient(gw.grpc_url)
            rejected: list[str] = []

            def mixed() -> None:
                _infer(client, "tiny", x)  # shadow policy: fp16 served, fp32 compared
                _infer(client, "tiny", x, parameters={"precision": "int8"})  # falls back
                try:
                    _infer(client, "tiny", bad, parameters={"precision": "fp32"})
                    rejected.append("accepted")
                except InferenceServerException as e:
                    rejected.append(str(e.status()))

            def close() -> None:
                client.close()
                process.stop(locust)

            missing, up = _data_under_load(prom, exprs, mixed, close)
    assert up == {"precision-serve": "up"}
    assert rejected and set(rejected) == {"StatusCode.INVALID_ARGUMENT"}, set(rejected)
    assert not missing, f"dashboard expressions without data: {sorted(missing)}"


def test_dashboard_triton_queries_return_data(
    tiny_repository: Path, tmp_path: Path, prometheus_binary: str, start_triton
) -> None:  # type: ignore[no-untyped-def]
    """Triton's own panels (Triton scraped, under direct load)."""
    exprs = [e for e in dashboard_exprs() if is_triton(e)]
    assert exprs, "the dashboard has no Triton (nv_inference_*) panel"
    triton = start_triton(tiny_repository)
    x = np.random.default_rng(1).normal(size=(2, 16)).astype(np.float32)
    targets = {"triton": triton.metrics_url.removeprefix("http://").removesuffix("/metrics")}
    with PrometheusServer(prometheus_binary, config_from_deploy(targets), tmp_path / "p") as prom:
        client = grpcclient.InferenceServerClient(triton.grpc_url)

        def traffic() -> None:
            for precision in ("fp32", "int8"):
                _infer(client, f"tiny_{precision}", x)

        missing, up = _data_under_load(prom, exprs, traffic, client.close)
    assert up == {"triton": "up"}
    assert not missing, f"Triton dashboard expressions without data: {sorted(missing)}"


def test_dashboard_llm_queries_return_data(
    tiny_llm_repository: Path, tmp_path: Path, prometheus_binary: str
) -> None:
    """TTFT, inter-token latency, tokens/s, finish reasons and active sequences per precision,
    from a gateway streaming the tiny Llama to the LLM Locust user and to a plain client."""
    import http.client

    from loadtest.llm_runner import LlmSettings, llm_locust_command
    from loadtest.llm_stream import completion_request, stream_completion

    exprs = [e for e in dashboard_exprs() if is_llm(e)]
    assert len(exprs) >= 7, exprs
    with GatewayProcess(tiny_llm_repository) as gw:
        metrics = gw.metrics_url.removeprefix("http://").removesuffix("/metrics")
        with PrometheusServer(
            prometheus_binary, config_from_deploy({"precision-serve": metrics}), tmp_path / "p"
        ) as prom:
            settings = StepSettings(
                model="tinyllm", target=gw.http_url, repository=None, duration_s=40, warmup_s=0
            )
            cmd = llm_locust_command(
                Step("fp32", 1, 1), settings, LlmSettings(max_tokens=16), 40,
                tmp_path / "locust", tmp_path / "rec.npz",
            )  # fmt: skip
            locust = process.start(cmd, log_path=tmp_path / "locust.log")
            host, port = gw.http_url.rsplit(":", 1)
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            request = completion_request("tinyllm", "int4", "Once upon a time", 16, api="chat")
            errors: list[str] = []

            def int4() -> None:
                r = stream_completion(conn, request, expect_precision="int4")
                if not r.ok:
                    errors.append(str(r.error))

            def close() -> None:
                conn.close()
                process.stop(locust)

            missing, up = _data_under_load(prom, exprs, int4, close)
            served = {
                r["metric"]["precision"]
                for r in prom.query(
                    "sum by (precision) (precision_serve_llm_requests_finished_total)"
                )
            }
    assert up == {"precision-serve": "up"}
    assert not errors, errors[:3]
    assert served == {"fp32", "int4"}
    assert not missing, f"LLM dashboard expressions without data: {sorted(missing)}"


# panels that must show Envoy-routed requests too (with the traffic, latency and error panels,
# which read the precision_serve_envoy_* series)
ENVOY_PANELS = ("Routing split", "Fallbacks", "Shadow top-1 agreement", "Shadow cosine (p50)")


def panel_exprs(titles: tuple[str, ...]) -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] if p["title"] in titles for t in p["targets"]]


def test_dashboard_envoy_front_queries_return_data(
    tiny_repository: Path, tmp_path: Path, prometheus_binary: str, start_triton
) -> None:  # type: ignore[no-untyped-def]
    """The Envoy front: inference never reaches the gateway's
    own request series; the traffic, latency, error, routing and fallback panels show it from
    Envoy's stats, the shadow panels from the samples Envoy mirrors to the control plane."""
    panels = panel_exprs(ENVOY_PANELS)
    assert len(panels) == len(ENVOY_PANELS), panels
    exprs = sorted({e for e in dashboard_exprs() if reads_envoy(e)} | set(panels))
    # request rate, p50/p95/p99, error share, errors by status, routing, fallbacks, 2 shadow
    assert len(exprs) >= 9, exprs
    triton = start_triton(tiny_repository, model_control="explicit")
    direct = grpcclient.InferenceServerClient(triton.grpc_url)
    direct.unload_model("tiny_int8")  # int8 requests: NOT_FOUND from Triton, retried on fp16
    x = np.random.default_rng(2).normal(size=(2, 16)).astype(np.float32)
    bad = np.zeros((1, 7), np.float32)  # wrong shape: Triton's INVALID_ARGUMENT through Envoy
    routing = tmp_path / "routing.yaml"
    shadow = {"reference": "fp32", "fraction": 1.0}
    routing.write_text(
        yaml.safe_dump(
            {"models": {"tiny": {"policy": "shadow", "precision": "fp16", "shadow": shadow}}}
        )
    )
    args = ["--upstream", f"triton://{triton.grpc_url}?front=envoy", "--routing", str(routing)]
    with GatewayProcess(tiny_repository, args) as gw:
        assert "envoy_admin_port" in gw.ports  # the Envoy front runs
        targets = {
            "precision-serve": gw.metrics_url.removeprefix("http://").removesuffix("/metrics")
        }
        with PrometheusServer(
            prometheus_binary, config_from_deploy(targets), tmp_path / "p"
        ) as prom:
            client = grpcclient.InferenceServerClient(gw.grpc_url)
            rejected: list[str] = []

            def traffic() -> None:
                _infer(client, "tiny", x)  # the shadow policy: fp16 served, fp32 compared
                for precision in ("fp32", "int8"):
                    _infer(client, "tiny", x, parameters={"precision": precision})
                try:
                    _infer(client, "tiny_fp16", bad)
                    rejected.append("accepted")
                except InferenceServerException as e:
                    rejected.append(str(e.status()))

            missing, up = _data_under_load(prom, exprs, traffic, client.close)
            # what the panels show came from Envoy: the gateway counted none of it itself
            own = prom.query('sum(precision_serve_requests_total{model="tiny"})')
            by_code = prom.query("sum by (precision, code) (precision_serve_envoy_responses_total)")
            routed = prom.query(
                "sum by (precision, policy) (precision_serve_envoy_routed_requests_total)"
            )
            retried = prom.query(
                "sum by (precision) (precision_serve_envoy_upstream_retries_total)"
            )
            # the series the gateway's HPA reads (deploy/k8s/monitoring): both exported at rest
            hpa = {
                name: prom.query(f'{name}{{model="tiny"}}')
                for name in (
                    "precision_serve_inflight_requests",
                    "precision_serve_envoy_upstream_active_requests",
                )
            }
    direct.close()
    assert up == {"precision-serve": "up"}
    assert rejected and set(rejected) == {"StatusCode.INVALID_ARGUMENT"}, set(rejected)
    assert not missing, f"Envoy-front dashboard expressions without data: {sorted(missing)}"
    assert not own or float(own[0]["value"][1]) == 0, own
    assert all(hpa.values()), hpa
    codes = {(r["metric"]["precision"], r["metric"]["code"]) for r in by_code}
    assert {("fp16", "ok"), ("fp32", "ok"), ("int8", "ok"), ("fp16", "INVALID_ARGUMENT")} <= codes
    policies = {
        (r["metric"]["precision"], r["metric"]["policy"])
        for r in routed
        if float(r["value"][1]) > 0  # every model route is exported, from 0
    }
    assert policies == {("fp16", "shadow"), ("fp32", "request"), ("int8", "request")}, policies
    retries = {r["metric"]["precision"]: float(r["value"][1]) for r in retried}
    assert retries.get("fp16", 0) > 0 and not retries.get("int8"), retries


def _every_expr(node: object) -> list[str]:
    """Every ``expr`` string anywhere in the dashboard JSON (collapsed rows nest their panels)."""
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [e for v in node.values() for e in _every_expr(v)]
    if isinstance(node, list):
        return [e for v in node for e in _every_expr(v)]
    return []


def test_every_dashboard_expression_is_checked() -> None:
    """The two live tests above query dashboard_exprs(): it must hold every expression of the
    dashboard, and each one must belong to the one server (gateway or Triton) it is sent to."""
    exprs = dashboard_exprs()
    everywhere = _every_expr(json.loads(DASHBOARD.read_text()))
    assert len(everywhere) >= 15
    assert sorted(exprs) == sorted(everywhere), "expressions the live tests would not query"
    triton = [e for e in exprs if is_triton(e)]
    gateway = [e for e in exprs if not is_triton(e)]
    assert triton and gateway
    for e in triton:
        assert "precision_serve_" not in e and "precision-serve" not in e, e
    for e in gateway:
        assert "nv_" not in e, e
        assert "precision_serve_" in e or 'job="precision-serve"' in e, e
    # the $model variable is filled from a gateway series that the gateway test checks
    variable = json.loads(DASHBOARD.read_text())["templating"]["list"][0]["query"]["query"]
    metric = variable.removeprefix("label_values(").split(",")[0].strip()
    assert any(metric in e for e in gateway), variable
