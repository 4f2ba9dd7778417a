"""``--schedule``: parsing, binning a record over time, the report; one scheduled run end to end
against a gateway whose ``slo`` policy must move (the served precision is recorded per request)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from loadtest.cli import build_parser, config_from_args
from loadtest.errors import ConfigError
from loadtest.runner import LOCUSTFILE, StepSettings
from loadtest.schedule import parse_schedule
from loadtest.scheduled import SHAPEFILE, schedule_command, write_schedule_report
from loadtest.timeline import bin_record, first_shift, load_record, within_objective
from server.runtime.runner import GatewayProcess
from tests.server.conftest import routing_repo  # noqa: F401  (fixture)


def test_steps_hold_and_end():
    s = parse_schedule("0:4,60:8,120:12,180:4")
    assert [s.users_at(t) for t in (0, 59.9, 60, 150, 180, 239)] == [4, 4, 8, 12, 4, 4]
    assert s.duration_s == 240  # the last step lasts as long as the one before it
    assert s.users_at(240) is None
    assert parse_schedule("0:2,10:3").duration_s == 20
    ended = parse_schedule("0:2,10:5,30:0")
    assert ended.duration_s == 30 and ended.users_at(29) == 5 and ended.peak_users == 5


def test_ramps_chain_linearly():
    s = parse_schedule("ramp:4-16:120,ramp:16-4:60")
    assert s.users_at(0) == 4
    assert s.users_at(60) == 10
    assert s.users_at(120) == 16
    assert s.users_at(150) == 10
    assert s.duration_s == 180 and s.users_at(180) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("5:4,10:8", "start at second 0"),
        ("0:4,10:8,5:2", "increase"),
        ("0:4,x", "SECONDS:USERS"),
        ("ramp:4-16:60,10:3", "ramp:FROM-TO:SECONDS"),
        ("ramp:0-4:60", "users >= 1"),
    ],
)
def test_bad_schedules_name_the_problem(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_schedule(text)


def record(tmp_path: Path) -> Path:
    """12 requests over 3 s: fp32 at first, int8 from the second second, one failure."""
    starts = 1000.0 + np.array([0.0, 0.2, 0.4, 0.6, 1.0, 1.2, 1.4, 1.6, 2.0, 2.2, 2.4, 2.6])
    latency = np.array([0.05] * 4 + [0.3] * 4 + [0.01] * 4)
    ok = np.array([True] * 11 + [False])
    precision = np.array(["fp32"] * 4 + ["fp32", "int8", "int8", "int8"] + ["int8"] * 3 + [""])
    path = tmp_path / "record.npz"
    np.savez(path, start=starts, latency=latency, ok=ok, precision=precision)
    return path


def test_bins_give_p99_throughput_mix_and_expected_loss(tmp_path):
    sched = parse_schedule("0:1,1:2,3:0")
    tl = bin_record(load_record(record(tmp_path)), "slo", 1.0, sched, {"fp32": 0.0, "int8": 0.8})
    assert [b.users for b in tl.bins] == [1, 2, 2]
    assert [b.requests for b in tl.bins] == [4, 4, 4]
    assert [b.failures for b in tl.bins] == [0, 0, 1]
    assert [b.throughput for b in tl.bins] == [4.0, 4.0, 3.0]
    assert tl.bins[1].p99_ms == pytest.approx(300.0)
    assert tl.bins[1].shares == {"fp32": 0.25, "int8": 0.75}
    assert tl.bins[1].expected_loss == pytest.approx(0.6)
    assert tl.bins[2].shares == {"int8": 1.0}  # the failure has no served precision
    assert within_objective(tl.bins, 100.0) == pytest.approx(2 / 3)
    assert first_shift(tl.bins, "fp32") == 1.0
    assert within_objective(tl.bins, 100.0, after_s=2.0) == 1.0
    paths = write_schedule_report(tmp_path / "out", [tl], ["# t"], 100.0, budget=1.0)
    text = paths["report"].read_text()
    assert "| 1 | 2 | 4.0 | 0 | 300.0 (over) | 25 | 75 | 0.600 |" in text
    assert paths["plot"].stat().st_size > 0


def test_a_request_counts_in_the_bin_where_it_completed():
    rec = {
        "start": np.array([0.0, 0.5]),
        "latency": np.array([0.1, 1.0]),
        "ok": np.array([True, True]),
        "precision": np.array(["fp32", "fp32"]),
    }
    tl = bin_record(rec, "x", 1.0)
    assert [b.requests for b in tl.bins] == [1, 1]
    assert tl.bins[1].p99_ms == pytest.approx(1000.0)


def test_cli_builds_a_scheduled_config_and_command(tmp_path):
    argv = ["--model", "tiny", "--repository", str(tmp_path), "--precisions", "policy"]
    argv += ["--schedule", "ramp:1-3:10", "--user-rate", "4", "--objective-ms", "50"]
    config = config_from_args(build_parser().parse_args(argv), argv)
    assert config.schedule is not None and config.schedule.peak_users == 3
    assert (config.user_rate, config.objective_ms) == (4.0, 50.0)
    s = StepSettings(model="tiny", target="h:1", repository=None, duration_s=10, warmup_s=0)
    cmd = schedule_command(s, "policy", config.schedule, 4.0, tmp_path / "c", tmp_path / "r")
    assert cmd[cmd.index("-f") + 1] == f"{LOCUSTFILE},{SHAPEFILE}" and SHAPEFILE.is_file()
    assert cmd[cmd.index("--schedule") + 1] == "ramp:1-3:10"
    assert "--users" not in cmd  # the shape decides
    with pytest.raises(ConfigError, match="user-rate"):
        argv2 = [*argv, "--user-rate", "-1"]
        config_from_args(build_parser().parse_args(argv2), argv2)


@pytest.mark.integration
@pytest.mark.slow  # a gateway and a Locust subprocess (~1 min on the shared 2-core host)
def test_scheduled_run_records_users_and_the_served_mix(routing_repo, tmp_path):  # noqa: F811
    routing = tmp_path / "routing.yaml"
    routing.write_text(
        "models:\n  tiny:\n    policy: slo\n"
        "    slo: {p99_ms: 0.001, window_requests: 5, up_windows: 1}\n"
    )
    out = tmp_path / "out"
    with GatewayProcess(routing_repo, ["--routing", str(routing)]) as gw:
        cmd = [sys.executable, "-m", "loadtest.cli", "--model", "tiny"]
        cmd += ["--repository", str(routing_repo), "--target", gw.grpc_url, "--no-metrics"]
        cmd += ["--precisions", "policy", "--schedule", "0:1,3:3,6:0", "--user-rate", "20"]
        cmd += ["--bin", "1", "--objective-ms", "100", "--out", str(out)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    tl = bin_record(load_record(out / "runs" / "policy" / "record.npz"), "x", 1.0)
    total = sum(b.requests for b in tl.bins)
    assert total > 20
    assert sum(b.failures for b in tl.bins) == 0
    served = [p for b in tl.bins for p in b.shares]
    assert "fp32" in served and "int8" in served  # the policy moved, and the client saw it
    # 1 user then 3 users, each paced at 20/s: the second half sends more
    first, second = tl.bins[:3], tl.bins[3:6]
    assert sum(b.requests for b in second) > sum(b.requests for b in first)
    assert (out / "timeline.png").is_file() and "## policy" in (out / "report.md").read_text()
