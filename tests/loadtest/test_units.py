"""Unit tests of the load test's pure parts: histogram maths, options, inputs, recommendations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from common.model_repository import samples_path
from loadtest import promtext
from loadtest.cli import LoadTestConfig, main, parse_timespan
from loadtest.errors import ConfigError
from loadtest.inputs import InputSpec, SampleInputs, load_inputs, synthetic
from loadtest.report import RunInfo, VariantInfo, comparison_table, recommendations
from loadtest.runner import StepResult

METRICS_BEFORE = """\
# TYPE precision_serve_requests counter
precision_serve_requests_total{model="m",precision="fp32",protocol="grpc",status="ok"} 10.0
# TYPE precision_serve_request_duration_seconds histogram
precision_serve_request_duration_seconds_bucket{model="m",precision="fp32",le="0.001"} 2.0
precision_serve_request_duration_seconds_bucket{model="m",precision="fp32",le="0.002"} 8.0
precision_serve_request_duration_seconds_bucket{model="m",precision="fp32",le="0.005"} 10.0
precision_serve_request_duration_seconds_bucket{model="m",precision="fp32",le="+Inf"} 10.0
precision_serve_request_duration_seconds_count{model="m",precision="fp32"} 10.0
precision_serve_request_duration_seconds_sum{model="m",precision="fp32"} 0.015
"""
METRICS_AFTER = """\
# TYPE precision_serve_requests counter
precision_serve_requests_total{model="m",precision="fp32",protocol="grpc",status="ok"} 110.0
precision_serve_requests_total{model="m",precision="fp32",protocol="grpc",status="NOT_OK"} 3.0
precision_serve_requests_total{model="m",precision="int8",protocol="grpc",status="ok"} 7.0
# TYPE precision_serve_request_duration_seconds histogram
precision_serve_request_duration_seconds_bucket{model="m",precision="fp32",le="0.001"} 2.0
precision_serve_request_duration_seconds_bucket{model="m",precision="fp32",le="0.002"} 28.0
precision_serve_request_duration_seconds_bucket{model="m",precision="fp32",le="0.005"} 110.0
precision_serve_request_duration_seconds_bucket{model="m",precision="fp32",le="+Inf"} 113.0
precision_serve_request_duration_seconds_count{model="m",precision="fp32"} 113.0
precision_serve_request_duration_seconds_sum{model="m",precision="fp32"} 0.345
"""


def test_window_delta_counts_and_histogram_median() -> None:
    window = promtext.delta(promtext.parse(METRICS_BEFORE), promtext.parse(METRICS_AFTER))
    view = promtext.server_view(window, "m", "fp32")
    assert view.requests == 103
    assert view.by_status == {"ok": 100, "NOT_OK": 3}
    # window buckets: <=1ms 0, <=2ms 20, <=5ms 100, +Inf 103; rank 51.5 lies in (2, 5] ms
    assert view.p50_bucket_ms == (2.0, 5.0)
    assert view.p50_ms == pytest.approx(2.0 + 3.0 * (51.5 - 20) / 80)
    assert view.p99_ms == pytest.approx(5.0)  # rank in +Inf: the highest finite bound, as PromQL
    assert view.mean_ms == pytest.approx(1000 * 0.33 / 103)
    assert promtext.server_view(window, "m", "int8").requests == 7


def test_quantile_matches_interpolation_on_uniform_data() -> None:
    rng = np.random.default_rng(0)
    values = rng.uniform(0, 10, 100_000)
    bounds = [1.0, 2.0, 4.0, 8.0, 10.0, math.inf]
    cumulative = [(b, float((values <= b).sum())) for b in bounds]
    for q in (0.1, 0.5, 0.9):
        assert promtext.quantile(q, cumulative) == pytest.approx(np.quantile(values, q), rel=0.02)
    assert promtext.quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]) is None


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("2m", 120), ("1h", 3600), ("7", 7)])
def test_parse_timespan(text: str, seconds: int) -> None:
    assert parse_timespan(text, "--duration") == seconds


def test_bad_options_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--duration"):
        parse_timespan("1.5s", "--duration")
    with pytest.raises(ConfigError, match="--users"):
        LoadTestConfig(model="m", out=tmp_path, users=[0], target="h:1")
    with pytest.raises(ConfigError, match="--target must be HOST:PORT"):
        LoadTestConfig(model="m", out=tmp_path, target="nohost")
    with pytest.raises(ConfigError, match="needs a model repository"):
        LoadTestConfig(model="m", out=tmp_path, repository=tmp_path / "missing")


def test_cli_error_is_one_line_and_exit_2(
    tiny_repository: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo, out = str(tiny_repository), str(tmp_path / "r")
    rc = main(["--repository", repo, "--model", "tiny", "--precisions", "fp32,bf99", "--out", out])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "no bf99 variant" in err and "built: fp32" in err


def test_inputs_prefer_builder_samples_then_manifest(tiny_repository: Path, tmp_path: Path) -> None:
    real = load_inputs(tiny_repository, "tiny")
    assert real is not None and real.origin == "samples"
    assert real.arrays["x"].dtype == np.float32 and real.arrays["x"].shape[1:] == (16,)
    assert samples_path(tiny_repository, "tiny").is_file()
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "tiny.manifest.json").write_text((tiny_repository / "tiny.manifest.json").read_text())
    fake = load_inputs(repo, "tiny")
    assert fake is not None and fake.origin == "synthetic (manifest)"
    assert load_inputs(tmp_path / "nothing", "tiny") is None


def test_batches_cycle_rows_and_synthetic_dtypes() -> None:
    arrays = synthetic(
        [InputSpec("input_ids", "int64", (8,)), InputSpec("attention_mask", "int64", (8,))], rows=5
    )
    assert (arrays["attention_mask"] == 1).all()
    batches = SampleInputs(arrays, "synthetic").batches(3, count=4)
    assert [b["input_ids"].shape for b in batches] == [(3, 8)] * 4
    assert (batches[1]["input_ids"][0] == arrays["input_ids"][3]).all()  # rows 3, 4, 0
    assert (batches[1]["input_ids"][2] == arrays["input_ids"][0]).all()
    with pytest.raises(ConfigError, match="batch size"):
        SampleInputs(arrays, "x").batches(0)


def _step(precision: str, users: int, p50: float, throughput: float) -> StepResult:
    lat = {"p50": p50, "p90": p50, "p95": p50, "p99": 2 * p50, "max": 3 * p50, "mean": p50}
    return StepResult(precision, users, 1, 100, 0, 1.0, 100.0, throughput, lat)


def test_recommendations_per_objective() -> None:
    results = [
        _step("fp32", 1, 4.0, 200),
        _step("fp32", 4, 9.0, 400),
        _step("fp16", 1, 3.0, 250),
        _step("fp16", 4, 8.0, 450),
        _step("int8", 1, 3.5, 300),
        _step("int8", 4, 6.0, 900),
    ]
    info = RunInfo(
        model="m",
        target="t",
        host={},
        command="",
        duration_s=3,
        warmup_s=1,
        accuracy_budget=1.0,
        variants={
            "fp32": VariantInfo(1.0, 99.0, 0.0),
            "fp16": VariantInfo(0.5, 99.0, 0.0),
            "int8": VariantInfo(0.25, 97.0, 2.0),  # outside the 1-point budget
        },
    )
    lines = recommendations(results, info)
    assert lines[0].startswith("lowest latency: **fp16**")
    assert lines[1].startswith("highest throughput: **int8**")
    assert lines[2].startswith("best within the accuracy budget (1 pt): **fp16**")
    table = comparison_table(results, info)
    assert "| int8 | 0.250 | 97.00 % (-2.00 pt) | 900 (u4, b1) | 3.50 / 7.00 |" in table
