"""``--workers 2``: two gateway processes on one gRPC port, one aggregated /metrics, SIGTERM
drains both and the supervisor exits 0."""

from __future__ import annotations

import os
import signal
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from common.process import wait_ready
from server.runtime.runner import GatewayProcess
from tests.helpers import metric_sum
from tests.server.conftest import ort_outputs, rows
from tests.server.test_lifecycle import make_slow_onnx

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLIENTS = 16  # separate channels = separate connections, spread by SO_REUSEPORT
CALLS = 10


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _infer(url: str, model: str, x: np.ndarray) -> np.ndarray:
    # a connection of its own: gRPC otherwise shares one between the channels of a process
    client = grpcclient.InferenceServerClient(
        url, channel_args=[("grpc.use_local_subchannel_pool", 1)]
    )
    try:
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp], client_timeout=60).as_numpy("logits")
    finally:
        client.close()


def _on_threads(n: int, work) -> list:
    results: list = [None] * n

    def run(i: int) -> None:
        try:
            results[i] = work(i)
        except Exception as e:  # reported by the assertions below
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return [threads, results]


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux /proc and SO_REUSEPORT")
def test_two_workers_serve_one_port_one_metrics_view_and_drain(repo_copy: Path):
    make_slow_onnx(repo_copy / "tiny_fp32" / "1" / "model.onnx")  # for the drain below
    x = rows(2, seed=4)
    want = ort_outputs(repo_copy, "int8", x)
    args = ["--workers", "2", "--upstream", "embedded?threads=1", "--shutdown", "drain=5"]
    gw = GatewayProcess(repo_copy, args, timeout=120).start()
    try:
        workers = gw.ports["workers"]
        assert len(workers) == 2 and gw.pid not in workers
        cpu_before = [_cpu_seconds(p) for p in workers]

        # load from several clients: every answer right, both workers did work
        def calls(i: int) -> list[np.ndarray]:
            return [_infer(gw.grpc_url, "tiny_int8", x) for _ in range(CALLS)]

        threads, results = _on_threads(CLIENTS, calls)
        for t in threads:
            t.join(120)
        for answers in results:
            assert not isinstance(answers, Exception), answers
            for got in answers:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        used = [_cpu_seconds(p) - c for p, c in zip(workers, cpu_before, strict=True)]
        assert all(u > 0.02 for u in used), used  # both took connections (idle is ~0)

        # one /metrics view: the count over both workers is every request sent
        labels = {"model": "tiny", "precision": "int8", "protocol": "grpc", "status": "ok"}
        total = metric_sum(gw.metrics_url, "precision_serve_requests_total", labels)
        assert total == CLIENTS * CALLS

        # SIGTERM while slow requests are in flight: all answered, every process exits 0
        slow_x = rows(32, seed=9)
        slow_want = ort_outputs(repo_copy, "fp32", slow_x)
        threads, results = _on_threads(4, lambda i: _infer(gw.grpc_url, "tiny_fp32", slow_x))
        inflight = {"model": "tiny"}

        def busy() -> bool:
            return metric_sum(gw.metrics_url, "precision_serve_inflight_requests", inflight) >= 2

        wait_ready(busy, 30, "slow requests in flight", interval=0.02)
        gw.proc.send_signal(signal.SIGTERM)
        # the drain window: the workers say not ready but still serve new requests
        wait_ready(lambda: not _ready(gw.http_url), 10, "ready to turn 503")
        np.testing.assert_allclose(_infer(gw.grpc_url, "tiny_int8", x), want, rtol=1e-5, atol=1e-6)
        assert gw.proc.poll() is None and not _ready(gw.http_url)
        assert gw.proc.wait(timeout=60) == 0, gw.log()
        for t in threads:
            t.join(60)
        for got in results:
            assert not isinstance(got, Exception), got
            np.testing.assert_allclose(got, slow_want, rtol=1e-4, atol=1e-4)
        for pid in workers:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid)
    finally:
        gw.stop()


def _ready(http_url: str) -> bool:
    """Whether /v2/health/ready answers 200 (both workers answer it: either says 503)."""
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=10) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().lower()
    except OSError:
        return "zombie"
