"""The LLM load-test report (loadtest/llm_report.py): ranking by tokens/s and TTFT with the
quality cost, the quality budget, and the client-bound line in both cases, on step results
given here; the files and plots it writes."""

from __future__ import annotations

import json
from pathlib import Path

from loadtest import llm_report
from loadtest.llm_report import (
    CLIENT_CPU_BOUND,
    SERVER_SHARE_BELOW,
    LlmRunInfo,
    LlmVariantInfo,
    client_bound,
    comparison_table,
    ranking,
    recommendations,
    write_llm_report,
)
from loadtest.llm_runner import LlmStepResult
from loadtest.report import RunInfo


def _ms(p50: float, p99: float) -> dict[str, float | None]:
    return {"p50": p50, "p90": p99, "p99": p99, "mean": p50}


def step(
    precision: str,
    users: int,
    tok_s: float,
    ttft: float,
    *,
    cpu: float | None = 0.2,
    share: float | None = 0.95,
    duration: float = 10.0,
) -> LlmStepResult:
    """A step whose gateway held its requests for ``share`` of the users' time."""
    server = None if share is None else {"busy_s": share * users * duration, "requests": 3}
    return LlmStepResult(
        precision=precision,
        users=users,
        requests=10,
        failures=0,
        duration_s=duration,
        requests_per_s=1.0,
        output_tokens=int(tok_s * duration),
        tokens_per_s=tok_s,
        ttft_ms=_ms(ttft, ttft * 2),
        itl_ms=_ms(20.0, 40.0),
        latency_ms=_ms(900.0, 1000.0),
        tokens_per_request=64.0,
        tokens_per_chunk=1.0,
        client_cpu_cores=cpu,
        server=server,
    )


VARIANTS = {
    "fp32": LlmVariantInfo(size_mb=519, ppl=10.07, ppl_ratio=1.0, kl_mean=0.0, top1_agreement=1),
    "int8": LlmVariantInfo(
        size_mb=259, ppl=10.08, ppl_ratio=1.0008, kl_mean=0.004, top1_agreement=0.97
    ),
    "int4": LlmVariantInfo(
        size_mb=86, ppl=12.57, ppl_ratio=1.248, kl_mean=0.34, top1_agreement=0.8
    ),
}


def _results() -> list[LlmStepResult]:
    return [
        step("fp32", 1, 18.0, 650.0),
        step("fp32", 2, 20.0, 900.0),
        step("int8", 1, 40.0, 1100.0),
        step("int8", 2, 46.0, 1500.0),
        step("int4", 1, 70.0, 600.0),
        step("int4", 2, 78.0, 800.0),
    ]


def test_ranking_by_tokens_and_by_ttft() -> None:
    by_tokens, by_ttft = ranking(_results())
    assert by_tokens == ["int4", "int8", "fp32"]  # peak tokens/s, highest first
    assert by_ttft == ["int4", "fp32", "int8"]  # TTFT p50 at 1 user, lowest first


def test_recommendations_carry_the_quality_cost_and_the_budget() -> None:
    lines = recommendations(_results(), VARIANTS, ppl_budget=1.05)
    text = "\n".join(lines)
    assert "by output tokens/s: **int4** 78.0 (ppl x1.248, KL 0.340, top-1 80.0%)" in text
    assert "> **int8** 46.0 (ppl x1.001" in text
    assert "by time to first token (p50 at the lightest load): **int4** 600 ms < **fp32**" in text
    # int4 is fastest but over a 5 % perplexity budget: int8 is the best within it
    assert lines[-1].startswith("best within the quality budget (ppl ratio <= 1.05): **int8**")
    loose = recommendations(_results(), VARIANTS, ppl_budget=1.3)[-1]
    assert "**int4**" in loose
    none = recommendations([step("int4", 1, 70.0, 600.0)], VARIANTS, ppl_budget=1.1)[-1]
    assert "none of int4" in none
    assert "unknown" in recommendations(_results(), {}, ppl_budget=1.05)[-1]
    silent = step("fp32", 1, 0.7, 0.0)
    silent.ttft_ms = {"p50": None, "p90": None, "p99": None, "mean": None}  # no text at all
    assert "no request produced text" in recommendations([silent], VARIANTS, 1.05)[2]


def test_client_bound_by_locust_cpu() -> None:
    results = _results()
    results[5] = step("int4", 2, 78.0, 800.0, cpu=CLIENT_CPU_BOUND + 0.1)
    bound, line = client_bound(results)
    assert bound
    assert "the client, not the model, bounds these figures** in 1 of 6 steps" in line
    assert "int4 at 2 user(s): Locust used 0.90 of a core" in line


def test_client_bound_by_an_idle_gateway() -> None:
    results = _results()
    results[1] = step("fp32", 2, 20.0, 900.0, share=SERVER_SHARE_BELOW - 0.2)
    bound, line = client_bound(results)
    assert bound
    assert "fp32 at 2 user(s): the gateway held the requests for only 30% of the users' time" in (
        line
    )
    assert recommendations(results, VARIANTS, 1.05)[0] == line


def test_model_bound_says_so_with_the_margins() -> None:
    bound, line = client_bound(_results())
    assert not bound
    assert line.startswith("the model, not the client, bounds these figures")
    assert "Locust used at most 0.20 of a core" in line and "95%-95%" in line
    no_metrics = [step("fp32", 1, 18.0, 650.0, share=None)]
    assert "no gateway metrics" in client_bound(no_metrics)[1]


def test_comparison_table_rows_in_rank_order() -> None:
    table = comparison_table(_results(), VARIANTS)
    rows = table.splitlines()[2:]
    assert [r.split("|")[2].strip() for r in rows] == ["int4", "int8", "fp32"]
    assert "12.57 (x1.248)" in rows[0] and "78.0 (u2)" in rows[0]
    assert "600.0 / 1200.0" in rows[0]  # TTFT p50 / p99 at 1 user


def test_write_llm_report_writes_tables_json_and_plots(tmp_path: Path) -> None:
    base = RunInfo(
        model="smollm2", target="127.0.0.1:1", host={}, command="x", duration_s=10,
        warmup_s=2, accuracy_budget=1.0,
    )  # fmt: skip
    info = LlmRunInfo(base, VARIANTS, "quality on test text", "chat", 64, 1.05)
    paths = write_llm_report(tmp_path, _results(), info)
    doc = json.loads(paths["json"].read_text())
    assert doc["kind"] == "llm" and doc["ranking"]["tokens_per_s"] == ["int4", "int8", "fp32"]
    assert doc["client_bound"] is False
    report = paths["report"].read_text()
    assert "`/v1/chat/completions`" in report and "quality on test text" in report
    for name in ("tokens_vs_users", "ttft_vs_users", "itl_vs_users", "ttft_vs_tokens"):
        assert paths[name].stat().st_size > 1000 and f"({name}.png)" in report
    assert paths["csv"].read_text().count("\n") == 7
    assert llm_report.server_share(_results()[0]) == 0.95


def test_cli_reads_the_kind_from_the_manifest_and_refuses_unbuilt_precisions(
    tiny_llm_repository: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    from loadtest.cli import build_parser, config_from_args, main

    argv = ["--repository", str(tiny_llm_repository), "--model", "tinyllm", "--out", str(tmp_path)]
    config = config_from_args(build_parser().parse_args(argv), argv)
    assert (config.kind, config.precisions) == ("llm", ["fp32", "int8", "int4"])
    assert config.request_timeout_s == 60.0  # an LLM's stream may stay silent that long
    assert main([*argv, "--precisions", "fp16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("precision-loadtest: error: model 'tinyllm' has no fp16 variant")
    assert main([*argv, "--schedule", "0:1"]) == 2
    assert "--schedule is for tensor models" in capsys.readouterr().err
