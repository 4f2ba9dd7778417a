"""NVIDIA's perf_analyzer, unchanged, through the Envoy front (``--upstream triton://…``, the
default front) to a real Triton: gRPC and HTTP inference on a variant and on a logical model,
``--streaming`` and ``--shared-memory system`` (these two reach the control plane behind
Envoy). Each run must end without an error, and Triton must have served the requests without a
failure; for plain gRPC, Envoy's own counter for the variant's cluster shows the requests went
client -> Envoy -> Triton, not through Python."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from bench.peers import perf_analyzer
from server.runtime.runner import GatewayProcess
from tests.helpers import skip_or_fail
from tests.triton.conftest import StartTriton

pytestmark = pytest.mark.integration
TIMING = ["-p", "300", "-s", "1000", "-r", "6"]  # short windows, any spread (timing knobs only)


def _envoy_requests(gw: GatewayProcess, cluster: str) -> int:
    url = f"http://127.0.0.1:{gw.ports['envoy_admin_port']}/stats?format=json&filter=upstream_rq_total$"
    stats = json.loads(urllib.request.urlopen(url, timeout=5).read())["stats"]
    return sum(
        int(s["value"]) for s in stats if s["name"] == f"cluster.{cluster}.upstream_rq_total"
    )


def _triton_counts(url: str, model: str) -> tuple[int, int]:
    (s,) = grpcclient.InferenceServerClient(url).get_inference_statistics(model).model_stats
    return s.inference_stats.success.count, s.inference_stats.fail.count


def test_perf_analyzer_through_the_envoy_front(
    tiny_repository: Path, start_triton: StartTriton, tmp_path: Path
) -> None:
    try:
        binary = perf_analyzer.binary()
    except perf_analyzer.PerfAnalyzerMissing as e:
        skip_or_fail(str(e))
        raise
    triton = start_triton(tiny_repository)
    upstream = f"triton://{triton.grpc_url}?http={triton.http_port}&front=envoy"
    runs = [
        ("grpc", "tiny_int8", []),
        ("grpc", "tiny_int8", ["-x", "1"]),  # the bench's command line: model_version "1"
        ("grpc", "tiny", []),
        ("http", "tiny_int8", []),
        ("grpc", "tiny_int8", ["--streaming"]),
        ("grpc", "tiny_int8", ["-x", "1", "--shared-memory", "system"]),
        ("http", "tiny_int8", ["-x", "1", "--shared-memory", "system"]),
    ]
    with GatewayProcess(tiny_repository, extra_args=["--upstream", upstream]) as gw:
        for i, (protocol, model, extra) in enumerate(runs):
            url = gw.grpc_url if protocol == "grpc" else gw.http_url
            report = tmp_path / f"run{i}.csv"
            served = "tiny_int8" if model == "tiny_int8" else None
            before = _triton_counts(triton.grpc_url, served) if served else None
            envoy_before = _envoy_requests(gw, "tiny_int8")
            cmd = [str(binary), "-m", model, "-u", url, "-i", protocol, *extra, *TIMING]
            done = subprocess.run(
                [*cmd, "-f", str(report)],
                capture_output=True,
                text=True,
                timeout=120,
                env=perf_analyzer.environment(),
            )
            said = f"{cmd}: " + (done.stdout + done.stderr)[-1500:]
            assert done.returncode == 0, said
            assert "error" not in said.lower() and "unable" not in said.lower(), said
            (row,) = perf_analyzer.parse_csv(report.read_text())
            assert row["rps"] > 0, said
            if before is not None:
                success, fail = _triton_counts(triton.grpc_url, "tiny_int8")
                assert success > before[0] and fail == before[1], said
            if protocol == "grpc" and extra in ([], ["-x", "1"]) and model == "tiny_int8":
                # through Envoy's cluster for the variant, not through Python
                assert _envoy_requests(gw, "tiny_int8") > envoy_before, said
        # the shared-memory runs unregistered their regions on the control plane
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        assert not client.get_system_shared_memory_status(as_json=True).get("regions")
