"""The benchmark's peers against real servers: KServe's ModelServer answering a v2 inference,
and perf_analyzer's CSV parsed from a real run against the gateway."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bench import clients
from tests.helpers import skip_or_fail

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def perf_analyzer_present() -> bool:
    from bench.peers import PeerError, perf_analyzer

    try:
        perf_analyzer.binary()
    except PeerError:
        return False
    return True


def test_kserve_peer_answers_a_v2_inference(tiny_repository: Path) -> None:
    from bench.peers import kserve_peer
    from common.engines import get_engine

    if not kserve_peer.available():
        skip_or_fail("kserve is not installed (make bench-tools)")
    feeds = {"x": np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 16)}
    path, name = kserve_peer.variant_file(tiny_repository, "tiny", "int8")
    expected = get_engine("onnxruntime").load(path, {}, 1).run(feeds)["logits"]
    with kserve_peer.KServePeer(tiny_repository, [("tiny", "int8")], threads=1) as peer:
        assert peer.grpc_url.startswith("127.0.0.1:")
        answer = clients.grpc_call(peer.grpc_url, clients.infer_request_bytes(name, feeds))
        got = clients.decode_response(answer)[0]
        wrong = clients.infer_request_bytes("no_such_model", feeds)
        with pytest.raises(Exception, match="no_such_model"):
            clients.grpc_call(peer.grpc_url, wrong)
        if perf_analyzer_present():  # perf_analyzer needs a ModelConfig, which KServe lacks
            from bench.peers import PeerError, perf_analyzer

            with pytest.raises(PeerError, match="failed to get model config"):
                perf_analyzer.measure(peer.grpc_url, name, 1, 500)
    assert set(got) == {"logits"}
    np.testing.assert_allclose(got["logits"], expected, rtol=0, atol=1e-6)
    assert peer.proc is not None and peer.proc.poll() is not None  # stopped on exit


def _stdout_figure(text: str, label: str) -> float:
    m = re.search(rf"{label}: ([0-9.]+)", text)
    assert m, f"no {label!r} in perf_analyzer's output: {text[-500:]}"
    return float(m.group(1))


def test_perf_analyzer_csv_from_a_real_run_against_the_gateway(
    tiny_repository: Path, tmp_path: Path
) -> None:
    from bench.peers import PeerError, perf_analyzer
    from server.runtime.runner import GatewayProcess

    try:
        perf_analyzer.binary()
    except PeerError as e:
        skip_or_fail(str(e))
    report = tmp_path / "report.csv"
    with GatewayProcess(
        tiny_repository, ["--upstream", "embedded?threads=1", "--log-level", "ERROR"]
    ) as gw:
        cmd = perf_analyzer.command(gw.grpc_url, "tiny_int8", 2, 1000, report)
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, env=perf_analyzer.environment()
        )
        assert done.returncode == 0, done.stdout[-800:] + done.stderr[-800:]
        via_measure = perf_analyzer.measure(gw.grpc_url, "tiny_int8", 4, 1000)
    [row] = perf_analyzer.parse_csv(report.read_text())
    # the CSV's figures are the ones perf_analyzer prints (us -> ms)
    assert row["concurrency"] == 2
    assert row["rps"] == pytest.approx(_stdout_figure(done.stdout, "Throughput"), rel=1e-4)
    assert row["p50_ms"] == pytest.approx(_stdout_figure(done.stdout, "p50 latency") / 1000)
    assert row["p99_ms"] == pytest.approx(_stdout_figure(done.stdout, "p99 latency") / 1000)
    assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
    assert via_measure["concurrency"] == 4 and via_measure["rps"] > 0
    assert via_measure["window_ms"] == 1000 and via_measure["stability_percent"] in (100, 400)


def test_perf_analyzer_without_a_binary_names_the_make_target(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from bench.peers import perf_analyzer

    monkeypatch.setenv("PERF_ANALYZER", str(tmp_path / "nothing"))
    with pytest.raises(perf_analyzer.PerfAnalyzerMissing, match="make bench-tools"):
        perf_analyzer.binary()
