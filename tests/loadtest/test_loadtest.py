"""``precision-loadtest`` end to end on the digits demo against a live gateway.

The gateway is started here (not by the tool) so the test scrapes its /metrics itself over the
whole run and checks the tool's numbers against it: every request the tool sent (warm-ups
included) is in the gateway's request counter for that precision, each measured window's count
equals the gateway's count for the same window, and the client's latencies lie between the
gateway's own and the closed-loop limit (``_check_latencies``).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest import promtext
from server.runtime.runner import GatewayProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PRECISIONS = ["fp32", "fp16", "int8"]
USERS = [1, 4]


def _check_latencies(step: dict) -> None:
    """Client latencies against two facts that hold however slow the machine is.

    1. The gateway's time for a request lies inside the client's wait for it, and the window's
       requests are the same on both sides (equal counts, asserted by the caller). So the client
       mean is at least the gateway's exact mean (its histogram sum / count), and the client
       median at least the lower edge of the gateway bucket that holds the gateway's median.
    2. Each Locust user waits for one request at a time (wait_time 0, batch 1), and every
       measured request starts and ends inside the step's duration. So the users' summed waits,
       requests x mean latency, are at most users x duration.
    Together they pin the client's latencies between the gateway's and the closed-loop limit, with
    no tolerance for speed: only float rounding (1e-6 relative).
    """
    key = (step["precision"], step["users"])
    lat, server = step["latency_ms"], step["server"]
    rel = 1e-6
    assert lat["mean"] >= server["mean_ms"] * (1 - rel), (key, lat["mean"], server["mean_ms"])
    low, _high = server["p50_bucket_ms"]
    assert lat["p50"] >= low * (1 - rel), (key, lat["p50"], low)
    busy_ms = step["requests"] * lat["mean"]
    window_ms = step["users"] * step["duration_s"] * 1000.0
    assert busy_ms <= window_ms * (1 + rel), (key, busy_ms, window_ms)


def test_precision_loadtest_on_digits(digits_repository: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    with GatewayProcess(digits_repository) as gw:
        before = promtext.scrape(gw.metrics_url)
        cmd = [
            sys.executable,
            "-m",
            "loadtest.cli",
            "--repository",
            str(digits_repository),
            "--model",
            "digits",
            "--precisions",
            ",".join(PRECISIONS),
            "--users",
            ",".join(map(str, USERS)),
            "--duration",
            "3s",
            "--warmup",
            "1s",
            "--target",
            gw.grpc_url,
            "--metrics-url",
            gw.metrics_url,
            "--out",
            str(out),
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:] + run.stdout[-3000:]
        whole = promtext.delta(before, promtext.scrape(gw.metrics_url))

    # every file the issue asks for
    for name in ("results.json", "results.csv", "report.md"):
        assert (out / name).stat().st_size > 0, name
    for name in ("throughput_vs_users.png", "latency_percentiles.png", "latency_throughput.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name

    doc = json.loads((out / "results.json").read_text())
    steps = doc["steps"]
    assert [(s["precision"], s["users"], s["batch_size"]) for s in steps] == [
        (p, u, 1) for p in PRECISIONS for u in USERS
    ]
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(steps)
    for s, row in zip(steps, rows, strict=True):
        assert s["requests"] > 0 and s["failures"] == 0, s
        assert s["throughput"] == pytest.approx(s["requests"] / s["duration_s"])  # batch 1
        lat = s["latency_ms"]
        assert 0 < lat["p50"] <= lat["p90"] <= lat["p95"] <= lat["p99"] <= lat["max"]
        assert int(row["requests"]) == s["requests"]
        assert float(row["p99_ms"]) == pytest.approx(lat["p99"], abs=1e-3)
        # the same window seen by the gateway: equal request counts, all ok, consistent latencies
        assert s["server"]["requests"] == s["requests"], s
        assert s["server"]["by_status"] == {"ok": s["requests"]}
        _check_latencies(s)
        # Locust's own final statistics name the calls model/precision, request type grpc
        slug = f"{s['precision']}_u{s['users']}_b1"
        stats = json.loads((out / "steps" / slug / "locust.json").read_text())
        (entry,) = stats
        assert (entry["method"], entry["name"]) == ("grpc", f"digits/{s['precision']}")
        assert (entry["num_requests"], entry["num_failures"]) == (s["requests"], 0)

    # independently of the tool: the gateway counted exactly what was sent, per precision
    for p in PRECISIONS:
        sent = sum(s["requests"] + s["warmup_requests"] for s in steps if s["precision"] == p)
        assert promtext.total(whole, promtext.REQUESTS, model="digits", precision=p) == sent

    report = (out / "report.md").read_text()
    first_table = report.split("\n\n")[2]
    assert first_table.startswith("| precision | model MB | accuracy (vs fp32) |")
    assert all(f"| {p} |" in first_table for p in PRECISIONS)
    for objective in ("lowest latency", "highest throughput", "best within the accuracy budget"):
        assert f"- {objective}" in report
    assert doc["host"]["cores"] >= 1 and str(doc["host"]["model"]) in report
    assert "Server side for the same windows" in report
    assert doc["inputs"] == "samples"  # real evaluation rows written by the builder


def test_locustfile_works_in_the_web_ui(tiny_repository: Path, tmp_path: Path) -> None:
    """``locust -f loadtest/locustfile.py`` as-is: start a swarm from the web UI's API, see
    ``tiny/int8`` in its statistics, stop it, and the process exits on SIGTERM."""
    import urllib.parse
    import urllib.request

    from common import process
    from common.process import wait_ready
    from tests.helpers import free_port

    def get(url: str, data: dict[str, str] | None = None) -> dict:
        body = urllib.parse.urlencode(data).encode() if data is not None else None
        with urllib.request.urlopen(url, data=body, timeout=10) as r:
            return json.loads(r.read() or b"{}")

    with GatewayProcess(tiny_repository) as gw:
        port = free_port()
        cmd = [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py"]
        cmd += ["--web-host", "127.0.0.1", "--web-port", str(port), "--host", gw.grpc_url]
        cmd += ["--model", "tiny", "--precision", "int8", "--repository", str(tiny_repository)]
        root = Path(__file__).resolve().parents[2]
        proc = process.start(cmd, log_path=tmp_path / "locust.log", cwd=root)
        try:
            ui = f"http://127.0.0.1:{port}"
            wait_ready(lambda: get(f"{ui}/stats/requests") is not None, 60, "the Locust web UI")
            assert get(f"{ui}/swarm", {"user_count": "2", "spawn_rate": "2"})["success"]

            def served() -> bool:
                stats = get(f"{ui}/stats/requests")["stats"]
                return any(s["name"] == "tiny/int8" and s["num_requests"] >= 20 for s in stats)

            wait_ready(served, 30, "requests in the web UI's statistics")
            get(f"{ui}/stop", {})
            stats = {s["name"]: s for s in get(f"{ui}/stats/requests")["stats"]}
            assert stats["tiny/int8"]["method"] == "grpc"
            assert stats["tiny/int8"]["num_failures"] == 0
        finally:
            rc = process.stop(proc, grace=20)
        assert rc is not None and proc.poll() is not None  # exited: no hang at shutdown
