"""Process-level behaviour: SIGTERM drain, CLI errors, bearer token, TLS, no torch."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from common.process import wait_ready
from server.runtime.runner import GatewayProcess
from tests.helpers import skip_or_fail
from tests.server.conftest import ort_outputs, rows

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def make_slow_onnx(path: Path, layers: int = 200, width: int = 1024) -> Path:
    """Same interface as the tiny model (x [-1,16] -> logits [-1,4]) but ~0.3 s a batch of 32."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w_in = rng.normal(0, 0.1, (16, width)).astype(np.float32)
    w = (np.eye(width) + rng.normal(0, 1e-3, (width, width))).astype(np.float32)
    w_out = rng.normal(0, 0.1, (width, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w_in"], ["h0"])]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"h{i}", "w"], [f"h{i + 1}"]))
    nodes.append(helper.make_node("MatMul", [f"h{layers}", "w_out"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        initializer=[
            numpy_helper.from_array(w_in, "w_in"),
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(w_out, "w_out"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def infer(url: str, x: np.ndarray, **kw) -> np.ndarray:
    client = grpcclient.InferenceServerClient(
        url, **{k: v for k, v in kw.items() if k in ("ssl", "root_certificates")}
    )
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    rest = {k: v for k, v in kw.items() if k not in ("ssl", "root_certificates")}
    return client.infer("tiny", [inp], **rest).as_numpy("logits")


def inflight(metrics_url: str, model: str) -> float | None:
    """The gateway's in-flight gauge for ``model``, parsed from /metrics (None: no such series)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    values = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "precision_serve_inflight_requests" and s.labels.get("model") == model
    ]
    return sum(values) if values else None


def test_sigterm_finishes_in_flight_requests_and_exits_zero(repo_copy):
    make_slow_onnx(repo_copy / "tiny_fp32" / "1" / "model.onnx")
    gw = GatewayProcess(repo_copy, ["--shutdown", "grace=20"]).start()
    try:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        x = rows(32, seed=9)
        want = ort_outputs(repo_copy, "fp32", x)
        inp = grpcclient.InferInput("x", [32, 16], "FP32")
        inp.set_data_from_numpy(x)
        results: list = []
        for _ in range(4):
            client.async_infer(
                "tiny", [inp], callback=lambda result, error: results.append((result, error))
            )

        seen: list[float | None] = []

        def busy() -> bool:
            seen.append(inflight(gw.metrics_url, "tiny"))
            return seen[-1] == 4

        wait_ready(busy, 20, f"four requests in flight (gauge seen: {seen[-5:]})", interval=0.02)
        answered_before_sigterm = len(results)
        gw.proc.send_signal(signal.SIGTERM)
        gw.proc.wait(timeout=30)
        assert gw.proc.returncode == 0, gw.log()
        wait_ready(lambda: len(results) == 4, 5, "all answers")
        # the drain is what answered them: the gateway still had work when it was told to stop
        assert answered_before_sigterm < 4, "all answered before SIGTERM: nothing was drained"
        for result, error in results:
            assert error is None, error
            np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-4, atol=1e-4)
        # it no longer accepts anything
        with pytest.raises(InferenceServerException):
            grpcclient.InferenceServerClient(gw.grpc_url).is_server_live(client_timeout=2)
        client.close()
    finally:
        gw.stop()
        gw._tmp.cleanup()


def _ready_status(http_url: str) -> int:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def _http_infer(http_url: str, x: np.ndarray) -> tuple[int, np.ndarray]:
    """One HTTP JSON inference on its own connection: (status, logits)."""
    body = json.dumps(
        {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                     "data": x.ravel().tolist()}]}
    )  # fmt: skip
    conn = http.client.HTTPConnection(http_url, timeout=60)
    try:
        conn.request("POST", "/v2/models/tiny/infer", body)
        resp = conn.getresponse()
        doc = json.loads(resp.read())
    finally:
        conn.close()
    logits = np.asarray(doc["outputs"][0]["data"], dtype=np.float32).reshape(x.shape[0], 4)
    return resp.status, logits


def test_sigterm_drain_window_not_ready_but_serving_then_exit_zero(repo_copy):
    """SIGTERM: ready turns 503 (HTTP) / false (gRPC) at once, the listeners stay open for
    --shutdown drain=S and serve new requests, the in-flight HTTP request is answered, exit 0."""
    make_slow_onnx(repo_copy / "tiny_fp32" / "1" / "model.onnx")
    gw = GatewayProcess(repo_copy, ["--shutdown", "drain=6,grace=20"]).start()
    try:
        x = rows(32, seed=5)
        want = ort_outputs(repo_copy, "fp32", x)
        in_flight: list = []
        sender = threading.Thread(target=lambda: in_flight.append(_http_infer(gw.http_url, x)))
        sender.start()
        wait_ready(lambda: inflight(gw.metrics_url, "tiny") == 1, 20, "a request in flight",
                   interval=0.02)  # fmt: skip
        gw.proc.send_signal(signal.SIGTERM)
        wait_ready(lambda: _ready_status(gw.http_url) == 503, 5, "ready to turn 503")
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        assert not client.is_server_ready() and not client.is_model_ready("tiny")
        assert client.is_server_live()
        # new requests during the drain window are still served, on both protocols
        small = rows(1, seed=6)
        np.testing.assert_allclose(
            infer(gw.grpc_url, small), ort_outputs(repo_copy, "fp32", small), rtol=1e-4, atol=1e-4
        )
        status, got = _http_infer(gw.http_url, small)
        assert status == 200
        assert gw.proc.poll() is None, "exited before the drain delay was over"
        assert _ready_status(gw.http_url) == 503
        client.close()
        assert gw.proc.wait(timeout=60) == 0, gw.log()
        sender.join(30)
        assert len(in_flight) == 1, "the in-flight request got no answer (reset?)"
        status, got = in_flight[0]
        assert status == 200
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    finally:
        gw.stop()
        gw._tmp.cleanup()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_bad_repository_and_routing_file_fail_with_one_line(tiny_repository, tmp_path, capsys):
    from server.cli import main

    routing = tmp_path / "r.yaml"
    routing.write_text("models:\n  tiny:\n    policy: split\n    weights: {fp8: 1}\n")
    ports = ["--ports", "0"]
    for args, needle in (
        (["--repository", str(tmp_path)], "holds no *.manifest.json"),
        (["--repository", str(tiny_repository), "--routing", str(tmp_path / "no.yaml")],
         "cannot read routing file"),
        (["--repository", str(tiny_repository), "--routing", str(routing)], "'fp8' is not built"),
        (["--repository", str(tiny_repository), "--upstream", "pigeon"], "unknown upstream"),
        (["--repository", str(tiny_repository), "--tls", "c.pem"], "--tls takes CERT,KEY"),
        (["--repository", str(tiny_repository), "--ports", "http=1,grpc=x"], "grpc='x'"),
        (["--repository", str(tiny_repository), "--ports", "gopher=70"], "unknown key 'gopher'"),
        (["--repository", str(tiny_repository), "--ports", "http=70000"], "0..65535"),
        (["--repository", str(tiny_repository), "--shutdown", "drain=-1"], "drain must be >= 0"),
        (["--repository", str(tiny_repository), "--upstream", "embedded?threads=-1"],
         "threads='-1': must be >= 0"),
        (["--repository", str(tiny_repository), "--upstream", "triton://h:1?merj=1"],
         "unknown setting 'merj'"),
        (["--repository", str(tiny_repository), "--upstream", "triton://h:1?cancel=maybe"],
         "cancel='maybe': must be one of detach, propagate"),
        (["--repository", str(tiny_repository), "--log-level", "loud"], "--log-level"),
        (["--repository", str(tiny_repository), "--auth-token", "t"], "unrecognized arguments"),
    ):  # fmt: skip
        assert main([*args, *ports]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("precision-serve: error:"), lines
        assert needle in lines[0]
    # and as a process: one line on stderr, exit status 2
    proc = run_cli("--repository", str(tmp_path / "missing"), *ports)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"precision-serve: error: model repository {tmp_path / 'missing'} does not exist"
    ]


def test_bearer_token_required_for_inference_only(tiny_repository):
    with GatewayProcess(tiny_repository, env={"PRECISION_SERVE_AUTH_TOKEN": "s3cret"}) as gw:
        g = grpcclient.InferenceServerClient(gw.grpc_url)
        assert g.is_server_ready() and g.is_model_ready("tiny")  # health stays open
        x = rows(1)
        with pytest.raises(InferenceServerException) as info:
            infer(gw.grpc_url, x)
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as info:
            infer(gw.grpc_url, x, headers={"authorization": "Bearer wrong"})
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        got = infer(gw.grpc_url, x, headers={"authorization": "Bearer s3cret"})
        assert got.shape == (1, 4)
        body = json.dumps(
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 16], "data": [0.0] * 16}]}
        ).encode()
        url = f"http://{gw.http_url}/v2/models/tiny/infer"
        with pytest.raises(urllib.error.HTTPError) as http_info:
            urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=10)
        assert http_info.value.code == 401
        req = urllib.request.Request(url, data=body, headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200


def test_tls_on_grpc_and_http(tiny_repository, tmp_path):
    if shutil.which("openssl") is None:
        skip_or_fail("openssl CLI is needed to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    args = ["--tls", f"{cert},{key}"]
    with GatewayProcess(tiny_repository, args, wait_ready=False) as gw:
        ctx = ssl.create_default_context(cafile=str(cert))
        ready_url = f"https://{gw.http_url}/v2/health/ready"
        wait_ready(
            lambda: urllib.request.urlopen(ready_url, context=ctx, timeout=2).status == 200,
            30,
            "TLS ready",
        )
        x = rows(2)
        got = infer(gw.grpc_url, x, ssl=True, root_certificates=str(cert))
        np.testing.assert_allclose(
            got, ort_outputs(tiny_repository, "fp32", x), rtol=1e-5, atol=1e-6
        )
        with pytest.raises(InferenceServerException):  # plaintext is refused
            grpcclient.InferenceServerClient(gw.grpc_url).is_server_live(client_timeout=3)
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, ConnectionError)):
            urllib.request.urlopen(f"http://{gw.http_url}/v2/health/ready", timeout=3)


def test_server_never_imports_torch(tiny_repository):
    code = (
        "import sys, server.cli, server.app, server.dataplane.gateway, "
        "server.transports.grpc.service, server.transports.http.app, "
        "server.upstreams.embedded.upstream, server.routing.policies, server.runtime.runner\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
    with GatewayProcess(tiny_repository) as gw:
        infer(gw.grpc_url, rows(1))
        maps = Path(f"/proc/{gw.pid}/maps")
        assert maps.exists() or not sys.platform.startswith("linux"), maps
        if maps.exists():
            assert "libtorch" not in maps.read_text() and "onnxruntime" in maps.read_text()


def test_in_process_gateway_closes_its_loop_with_nothing_pending(tiny_repository, caplog):
    """A task still pending on the gateway's loop when it stops (as gRPC's per-call tasks are for
    a few loop turns after a refused call) is cancelled and awaited before the loop closes. A
    loop closed under such tasks left them to log "Task was destroyed but it is pending" and a
    GeneratorExit traceback on stderr whenever the garbage collector met them later, inside
    whatever code ran then (seen in CI in a CLI test's one-line stderr)."""
    import asyncio
    import gc
    import logging

    from server.app import ServeOptions
    from server.routing.options import RoutingOptions
    from server.runtime.runner import InProcessGateway
    from server.transports.options import ListenOptions, Ports

    options = ServeOptions(
        RoutingOptions(tiny_repository), listen=ListenOptions(ports=Ports(0, 0, 0))
    )

    async def outlives_the_server() -> None:
        await asyncio.sleep(3600)

    async def spawn() -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(outlives_the_server())

    with InProcessGateway(options) as g:
        task = g.call(spawn())
    assert task.cancelled()
    del task
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
    assert [r.getMessage() for r in caplog.records if "destroyed" in r.getMessage()] == []
