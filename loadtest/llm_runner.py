"""One LLM load-test step: a headless Locust subprocess streaming completions
(loadtest/locustfile_llm.py), warm-up then the measured run, the gateway's /metrics scraped
around the measured run (as :mod:`loadtest.runner` does for tensor models)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from loadtest import promtext
from loadtest.errors import StepError
from loadtest.runner import (
    RUN_TIME_SLACK_S,
    STOP_TIMEOUT_S,
    Step,
    StepSettings,
    _locust_errors,
    locust_prefix,
    measure_step,
)

LOCUSTFILE_LLM = Path(__file__).with_name("locustfile_llm.py")


@dataclass
class LlmSettings:
    """What every LLM step asks for (the gateway target etc. are in StepSettings)."""

    api: str = "completions"
    max_tokens: int = 64
    prompt: str | None = None  # None: the locustfile's default paragraph
    temperature: float = 0.0


def _pcts(values_s: np.ndarray) -> dict[str, float | None]:
    v = values_s[np.isfinite(values_s)] * 1000.0
    if v.size == 0:
        return {k: None for k in ("p50", "p90", "p99", "mean")}
    return {
        "p50": float(np.percentile(v, 50)),
        "p90": float(np.percentile(v, 90)),
        "p99": float(np.percentile(v, 99)),
        "mean": float(v.mean()),
    }


@dataclass
class LlmStepResult:
    precision: str
    users: int
    requests: int
    failures: int
    duration_s: float  # first request sent -> last stream ended
    requests_per_s: float  # successful requests per second
    output_tokens: int  # successful requests' completion tokens
    tokens_per_s: float  # output tokens per second over the window, all users together
    ttft_ms: dict[str, float | None]  # p50 p90 p99 mean over successful requests
    itl_ms: dict[str, float | None]  # over every inter-token gap (per token, see llm_stream)
    latency_ms: dict[str, float | None]  # whole stream, sent -> [DONE]
    tokens_per_request: float
    tokens_per_chunk: float  # > 1: the gateway put several tokens in some chunks
    client_cpu_cores: float | None  # Locust's CPU seconds / wall seconds over the run
    errors: dict[str, int] = field(default_factory=dict)
    warmup_requests: int = 0
    server: dict[str, object] | None = None  # promtext.LlmServerView.to_dict() for the window
    server_note: str = ""
    batch_size: int = 1  # the tensor report's shape; one prompt per request

    @property
    def throughput(self) -> float:
        return self.tokens_per_s

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def llm_locust_command(
    step: Step, s: StepSettings, llm: LlmSettings, run_s: int, csv_prefix: Path, record: Path
) -> list[str]:
    args = [
        *locust_prefix(str(LOCUSTFILE_LLM)),
        "--users", str(step.users),
        "--spawn-rate", str(step.users),
        "--run-time", f"{run_s + RUN_TIME_SLACK_S}s",  # a safety net only: --stop-after ends it
        "--stop-after", str(run_s),
        # in-flight streams may finish (a slow variant's 64 tokens can take longer than the
        # tensor steps' STOP_TIMEOUT_S); none is cut off after the gateway counted it
        "--stop-timeout", str(max(STOP_TIMEOUT_S, round(s.request_timeout_s))),
        "--host", s.target,
        "--only-summary",
        "--loglevel", "WARNING",
        "--exit-code-on-error", "0",
        "--csv", str(csv_prefix),
        "--model", s.model,
        "--precision", step.precision,
        "--precision-via", s.precision_via,
        "--request-timeout", str(s.request_timeout_s),
        "--record", str(record),
        "--api", llm.api,
        "--max-tokens", str(llm.max_tokens),
        "--temperature", str(llm.temperature),
    ]  # fmt: skip
    if llm.prompt is not None:
        args += ["--prompt", llm.prompt]
    return args


def summarise_llm(step: Step, record: Path, csv_prefix: Path) -> LlmStepResult:
    if not record.is_file():
        raise StepError(f"locust left no record at {record}")
    with np.load(record) as d:
        data = {k: d[k] for k in d.files}
    ok = data["ok"].astype(bool)
    requests = int(ok.size)
    if requests == 0:
        raise StepError(f"step {step.slug}: no request completed")
    start, latency = data["start"], data["latency"]
    duration = max(float((start + latency).max() - start.min()), 1e-9)
    good = int(ok.sum())
    tokens = int(data["tokens"][ok].sum())
    chunks = int(data["chunks"][ok].sum())
    wall, cpu = (float(x) for x in data["client_cpu"])
    errors: dict[str, int] = {}
    for e in data["error"][~ok]:
        errors[str(e)[:160]] = errors.get(str(e)[:160], 0) + 1
    return LlmStepResult(
        precision=step.precision,
        users=step.users,
        requests=requests,
        failures=requests - good,
        duration_s=duration,
        requests_per_s=good / duration,
        output_tokens=tokens,
        tokens_per_s=tokens / duration,
        ttft_ms=_pcts(data["ttft"][ok]),
        itl_ms=_pcts(data["itl"]),
        latency_ms=_pcts(latency[ok]),
        tokens_per_request=tokens / good if good else 0.0,
        tokens_per_chunk=tokens / chunks if chunks else 0.0,
        client_cpu_cores=cpu / wall if wall > 0 else None,
        errors=errors or _locust_errors(csv_prefix),
    )


def run_llm_step(step: Step, s: StepSettings, llm: LlmSettings) -> LlmStepResult:
    """Warm up (not counted), scrape, measure, scrape; the result of the measured run."""
    measured = measure_step(
        step,
        s,
        lambda seconds, prefix, record: llm_locust_command(step, s, llm, seconds, prefix, record),
        60 + STOP_TIMEOUT_S + 2 * s.request_timeout_s,
    )
    result = summarise_llm(step, measured.record, measured.work / "locust")
    result.warmup_requests = measured.warmup_requests
    if measured.window is not None:
        view = promtext.llm_server_view(measured.window, s.model, step.precision)
        result.server = view.to_dict()
    result.server_note = measured.note
    return result
