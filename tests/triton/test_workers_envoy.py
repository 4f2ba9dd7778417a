"""``--workers 2`` in front of a real Triton: with ``?front=envoy`` ONE Envoy (the first worker's
child) on the public ports, inference straight to Triton, control requests spread over both
workers' control planes behind it, Envoy's families on the supervisor's ``/metrics``, SIGTERM
drains and exits 0; with ``front=auto`` in front of a tritonserver that crashes on cancels (the
nvidia-pytriton wheel's 2.51), the Python front on the public ports for both workers, as before.

Which process listens where is read from ``/proc`` (each worker's listening sockets); what Envoy
sent to which control plane from its admin ``/clusters`` (per-host counters)."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from common.process import wait_ready
from server.launcher.distribution import TritonDistribution
from server.launcher.tritonserver import TritonOptions, TritonServer
from server.runtime.runner import GatewayProcess
from server.upstreams.triton.detach import crashes_on_cancel
from tests.helpers import metric_sum

pytestmark = [pytest.mark.integration, pytest.mark.slow]
X = np.random.default_rng(11).normal(size=(2, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def triton(
    tiny_repository: Path,
    triton_distribution: TritonDistribution,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TritonServer]:
    """One tritonserver (pytriton's 2.51) for this module's tests."""
    work = tmp_path_factory.mktemp("triton-workers")
    options = TritonOptions(
        repository=tiny_repository,
        grpc_port=0,
        http_port=0,
        metrics_port=0,
        log_file=work / "triton.log",
        work_dir=work / "triton",
        startup_timeout=90.0,
    )
    server = TritonServer(options, triton_distribution).start()
    try:
        yield server
    finally:
        server.stop()


def _listening(pid: int) -> set[int]:
    """The TCP ports ``pid`` listens on (its socket fds matched with /proc/net/tcp{,6})."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _children(pid: int) -> list[int]:
    return sorted(
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    )


def _gone(pid: int) -> bool:
    try:
        return "zombie" in Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return True


def _control_hosts(gw: GatewayProcess, cluster: str) -> dict[int, int]:
    """The port of each host of an Envoy cluster -> the replies it gave (rq_success)."""
    url = f"http://127.0.0.1:{gw.ports['envoy_admin_port']}/clusters?format=json"
    doc = json.loads(urllib.request.urlopen(url, timeout=5).read())
    (found,) = [c for c in doc["cluster_statuses"] if c["name"] == cluster]
    out = {}
    for host in found["host_statuses"]:
        stats = {s["name"]: int(s.get("value", 0)) for s in host["stats"]}
        out[host["address"]["socket_address"]["port_value"]] = stats.get("rq_success", 0)
    return out


def _infer(client: grpcclient.InferenceServerClient, model: str, precision: str) -> str:
    t = grpcclient.InferInput("x", list(X.shape), "FP32")
    t.set_data_from_numpy(X)
    result = client.infer(model, [t], parameters={"precision": precision}, client_timeout=30)
    return result.get_response().parameters["precision"].string_param


def _ready(gw: GatewayProcess) -> bool:
    try:
        with urllib.request.urlopen(f"http://{gw.http_url}/v2/health/ready", timeout=10) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


def test_two_workers_behind_one_envoy(tiny_repository: Path, triton: TritonServer) -> None:
    upstream = f"triton://{triton.grpc_url}?front=envoy"
    args = ["--workers", "2", "--upstream", upstream, "--shutdown", "drain=3,grace=2"]
    gw = GatewayProcess(tiny_repository, args, timeout=180).start()
    try:
        assert gw.ports["front"] == "envoy", gw.log()
        first, peer = gw.ports["workers"]
        (envoy,) = _children(first)  # one Envoy, the first worker's child
        assert _children(peer) == []
        public = {gw.ports["grpc_port"], gw.ports["http_port"]}
        assert public <= _listening(envoy)
        assert not public & (_listening(first) | _listening(peer))  # no worker on them

        # inference: Envoy -> Triton; the gateway's own request counter stays still
        own = {"model": "tiny", "protocol": "grpc"}
        routed = {"model": "tiny", "precision": "int8", "protocol": "grpc"}
        envoy_name = "precision_serve_envoy_upstream_requests_total"
        before_own = metric_sum(gw.metrics_url, "precision_serve_requests_total", own)
        before_envoy = metric_sum(gw.metrics_url, envoy_name, routed)
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        for _ in range(4):
            assert _infer(client, "tiny", "int8") == "int8"
        assert metric_sum(gw.metrics_url, envoy_name, routed) == before_envoy + 4
        routed_total = "precision_serve_envoy_routed_requests_total"
        assert metric_sum(gw.metrics_url, routed_total, routed) >= 4
        assert metric_sum(gw.metrics_url, "precision_serve_requests_total", own) == before_own

        # control requests: answered, and spread over both workers' control planes
        before = _control_hosts(gw, "control_grpc")
        for _ in range(8):
            meta = client.get_model_metadata("tiny")
            assert meta.name == "tiny" and [i.name for i in meta.inputs] == ["x"]
        after = _control_hosts(gw, "control_grpc")
        served = {port: after[port] - before.get(port, 0) for port in after}
        assert sum(served.values()) == 8 and len(served) == 2, served
        by_worker = {pid: sum(served.get(p, 0) for p in _listening(pid)) for pid in (first, peer)}
        assert all(n > 0 for n in by_worker.values()), (by_worker, served)
        with urllib.request.urlopen(f"http://{gw.http_url}/v2/models/tiny", timeout=10) as r:
            assert json.loads(r.read())["name"] == "tiny"
        client.close()

        # SIGTERM: not ready through either worker during the drain, then every process exits 0
        assert _ready(gw)
        gw.proc.send_signal(signal.SIGTERM)
        wait_ready(lambda: not _ready(gw), 10, "ready to turn 503")
        assert not any(_ready(gw) for _ in range(4))  # round robin: both workers answer
        assert gw.proc.wait(timeout=60) == 0, gw.log()
        assert all(_gone(pid) for pid in (first, peer, envoy))
    finally:
        gw.stop()


def test_auto_keeps_the_python_front_for_every_worker(
    tiny_repository: Path, triton: TritonServer
) -> None:
    """``front=auto`` (cancel=detach) before a tritonserver < 2.53: the first worker says
    python, both workers listen on the public ports, no Envoy."""
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    assert crashes_on_cancel(client.get_server_metadata().version)
    client.close()
    args = ["--workers", "2", "--upstream", f"triton://{triton.grpc_url}"]
    with GatewayProcess(tiny_repository, args, timeout=180) as gw:
        assert gw.ports["front"] == "python" and "envoy_admin_port" not in gw.ports
        workers = gw.ports["workers"]
        for pid in workers:
            assert _children(pid) == []
            assert {gw.ports["grpc_port"], gw.ports["http_port"]} <= _listening(pid)
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        assert _infer(client, "tiny", "int8") == "int8"
        client.close()
        assert "tritonserver < 2.53 can crash when a call is cancelled" in gw.log()
