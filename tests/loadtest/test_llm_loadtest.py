"""The LLM load test against a real gateway serving the tiny random Llama (fp32, int8, int4):
streamed completions and chat timed by the client agree with the gateway's own metrics, and
``precision-loadtest`` (kind read from the manifest) runs Locust steps per precision and writes
the ranked report."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.model_repository import load_manifest, manifest_path
from loadtest import promtext
from loadtest.cli import main
from loadtest.llm_stream import completion_request, stream_completion
from server.runtime.runner import GatewayProcess

pytestmark = [pytest.mark.integration]

MODEL = "tinyllm"


@pytest.fixture(scope="module")
def gateway(tiny_llm_repository: Path) -> Iterator[GatewayProcess]:
    with GatewayProcess(tiny_llm_repository) as gw:
        yield gw


def _conn(gw: GatewayProcess) -> http.client.HTTPConnection:
    host, port = gw.http_url.rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=60)


def test_client_timing_agrees_with_the_gateway(gateway: GatewayProcess) -> None:
    """Per request: tokens as usage says, the asked precision served, the first token before
    the last; over the window the gateway counts the same requests and tokens, and its TTFT
    (arrival -> first text) is never longer than the client's (sent -> first chunk)."""
    before = promtext.scrape(gateway.metrics_url)
    conn = _conn(gateway)
    results = {}
    for api in ("completions", "chat"):
        for precision in ("fp32", "int4"):
            req = completion_request(MODEL, precision, "Once upon a time", 12, api=api)
            r = stream_completion(conn, req, expect_precision=precision)
            assert r.ok, r.error
            results[api, precision] = r
            assert r.served == precision
            assert r.finish_reason in ("stop", "length")
            assert 0 < r.output_tokens <= 12 and r.output_tokens >= len(r.chunk_offsets_s)
            if r.finish_reason == "length":
                assert r.output_tokens == 12
            assert r.ttft_s is not None and 0 < r.ttft_s <= r.chunk_offsets_s[-1] <= r.latency_s
            assert len(r.itl_samples()) == len(r.chunk_offsets_s) - 1
    conn.close()
    window = promtext.delta(before, promtext.scrape(gateway.metrics_url))
    for precision in ("fp32", "int4"):
        view = promtext.llm_server_view(window, MODEL, precision)
        mine = [r for (_, p), r in results.items() if p == precision]
        assert view.requests == len(mine)
        assert view.generated_tokens == sum(r.output_tokens for r in mine)
        gateway_ttft = promtext.total(
            window, f"{promtext.LLM_TTFT}_sum", model=MODEL, precision=precision
        )
        assert 0 < gateway_ttft <= sum(r.ttft_s for r in mine)  # type: ignore[misc]


def test_a_bad_request_is_an_error_not_a_crash(gateway: GatewayProcess) -> None:
    conn = _conn(gateway)
    r = stream_completion(conn, completion_request(MODEL, "fp16", "Hi", 4))  # not built
    assert not r.ok and r.error is not None and "HTTP 404" in r.error
    ok = stream_completion(conn, completion_request(MODEL, "int4", "Hi", 4))  # conn reopened
    assert ok.ok, ok.error


def test_precision_loadtest_streams_every_variant_and_ranks_them(
    gateway: GatewayProcess, tiny_llm_repository: Path, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "report"
    metrics = gateway.metrics_url
    rc = main(
        ["--repository", str(tiny_llm_repository), "--model", MODEL, "--target",
         gateway.http_url, "--metrics-url", metrics, "--users", "1", "--duration", "2s",
         "--warmup", "0", "--max-tokens", "16", "--out", str(out)]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert rc == 0, printed
    doc = json.loads((out / "results.json").read_text())
    assert doc["kind"] == "llm"  # from the manifest's task: no --kind given
    steps = doc["steps"]
    built = list(load_manifest(manifest_path(tiny_llm_repository, MODEL)).variants)
    assert [(s["precision"], s["users"]) for s in steps] == [(p, 1) for p in built]
    for s in steps:
        assert s["requests"] > 0 and s["failures"] == 0, s
        assert s["tokens_per_s"] > 0 and s["ttft_ms"]["p50"] > 0 and s["itl_ms"]["p50"] > 0
        # the gateway saw exactly the measured window's requests and tokens
        assert s["server"]["requests"] == s["requests"], s
        assert s["server"]["generated_tokens"] == s["output_tokens"], s
        assert 0 < s["client_cpu_cores"] < 2
    assert sorted(doc["ranking"]["tokens_per_s"]) == sorted(built)
    assert doc["variants"]["int4"]["ppl_ratio"] is not None  # the builder's quality record
    report = (out / "report.md").read_text()
    assert "bounds these figures" in report and "by output tokens/s:" in report
    assert "by time to first token" in printed
    for plot in ("tokens_vs_users", "ttft_vs_users", "itl_vs_users", "ttft_vs_tokens"):
        assert (out / f"{plot}.png").stat().st_size > 1000
