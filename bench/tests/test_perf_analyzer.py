"""NVIDIA's perf_analyzer against the gateway (the drop-in check: ``make test-lab``, which has the
binary) with its default protocol options: no ``-x``
(model version), synchronous gRPC or HTTP, and ``--streaming``; for a variant's name and a
logical name. Only the measurement window is shortened and the stability bar lowered, so that a
run takes seconds on a shared host (they change how long it measures, not what it asks).

The binary is the bench extra's (``make bench-tools``; ``PERF_ANALYZER`` names another): missing,
the test skips on a laptop and fails under CI=true.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from bench.peers import perf_analyzer
from tests.helpers import skip_or_fail

pytestmark = pytest.mark.integration

# shorter windows, any spread accepted: timing knobs only (see the module docstring)
TIMING = ["-p", "300", "-s", "1000", "-r", "6"]


@pytest.fixture(scope="module")
def binary() -> Path:
    try:
        return perf_analyzer.binary()
    except perf_analyzer.PerfAnalyzerMissing as e:
        skip_or_fail(str(e))
        raise


def _counts(gw, model: str) -> tuple[int, int]:
    (s,) = grpcclient.InferenceServerClient(gw.grpc_url).get_inference_statistics(model).model_stats
    return s.inference_stats.success.count, s.inference_stats.fail.count


@pytest.mark.parametrize(
    ("protocol", "model", "extra"),
    [
        ("grpc", "tiny_int8", []),
        ("grpc", "tiny", []),
        ("http", "tiny_int8", []),
        ("http", "tiny", []),
        ("grpc", "tiny", ["--streaming"]),
    ],
    ids=["grpc-variant", "grpc-logical", "http-variant", "http-logical", "grpc-streaming"],
)
def test_perf_analyzer_default_options(binary, gateway, tmp_path, protocol, model, extra):
    url = gateway.grpc_url if protocol == "grpc" else gateway.http_url
    report = tmp_path / "out.csv"
    before = _counts(gateway, model)
    cmd = [str(binary), "-m", model, "-u", url, "-i", protocol, *extra, *TIMING, "-f", str(report)]
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=perf_analyzer.environment()
    )
    said = (done.stdout + done.stderr)[-1500:]
    assert done.returncode == 0, said
    assert "error" not in said.lower(), said
    (row,) = perf_analyzer.parse_csv(report.read_text())
    assert row["concurrency"] == 1 and row["rps"] > 0, row
    success, fail = _counts(gateway, model)
    assert success > before[0] and fail == before[1]  # the gateway served them, none failed


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_perf_analyzer_with_system_shared_memory(binary, gw, tmp_path, protocol):
    client = grpcclient.InferenceServerClient(gw.grpc_url)

    def counts():
        [s] = client.get_inference_statistics("tiny_int8").model_stats
        return s.inference_stats.success.count, s.inference_stats.fail.count

    before = counts()
    report = tmp_path / "report.csv"
    url = gw.grpc_url if protocol == "grpc" else gw.http_url
    # -x 1 until perf_analyzer's default (latest) version resolves against the gateway
    cmd = [
        str(binary), "-m", "tiny_int8", "-x", "1", "-u", url, "-i", protocol,
        "--shared-memory", "system", "--concurrency-range", "1", "-p", "500",
        "-s", "1000", "-r", "6", "-f", str(report),
    ]  # fmt: skip
    done = subprocess.run(
        cmd, capture_output=True, text=True, timeout=120, env=perf_analyzer.environment()
    )
    said = done.stdout[-1500:] + done.stderr[-1500:]
    assert done.returncode == 0, said
    assert "error" not in said.lower() and "unable" not in said.lower(), said
    [row] = perf_analyzer.parse_csv(report.read_text())
    assert row["rps"] > 0
    success, fail = counts()
    assert success > before[0] and fail == before[1]
    # it unregistered its regions when done
    assert not client.get_system_shared_memory_status(as_json=True).get("regions")
