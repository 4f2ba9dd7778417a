"""The gateway's own view of a load-test step: /metrics scraped before and after, differenced.

Quantiles come from histogram buckets the way PromQL's ``histogram_quantile`` computes them
(linear interpolation inside the bucket that holds the rank), so they are estimates whose
resolution is the bucket width.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from loadtest.errors import LoadTestError

Labels = tuple[tuple[str, str], ...]
Samples = dict[tuple[str, Labels], float]

REQUESTS = "precision_serve_requests_total"
E2E = "precision_serve_request_duration_seconds"
QUEUE = "precision_serve_queue_duration_seconds"
UPSTREAM = "precision_serve_upstream_duration_seconds"
BATCH = "precision_serve_batch_size"


class ScrapeError(LoadTestError):
    """The metrics endpoint could not be read."""


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def scrape(url: str, timeout: float = 5.0) -> Samples:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return parse(r.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ScrapeError(f"cannot scrape {url}: {e}") from e


def delta(before: Samples, after: Samples) -> Samples:
    """after - before for every series in ``after`` (series new in ``after`` count from 0)."""
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _match(labels: Labels, want: Mapping[str, str]) -> bool:
    d = dict(labels)
    return all(d.get(k) == v for k, v in want.items())


def total(samples: Samples, name: str, **want: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and _match(lab, want))


def by_label(samples: Samples, name: str, label: str, **want: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (n, lab), v in samples.items():
        if n == name and _match(lab, want):
            key = dict(lab).get(label, "")
            out[key] = out.get(key, 0.0) + v
    return out


def buckets(samples: Samples, histogram: str, **want: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of a histogram, summed over matching series."""
    acc: dict[float, float] = {}
    for (n, lab), v in samples.items():
        if n == f"{histogram}_bucket" and _match(lab, want):
            le = float(dict(lab)["le"])
            acc[le] = acc.get(le, 0.0) + v
    return sorted(acc.items())


def quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """PromQL histogram_quantile over cumulative buckets; None without observations."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    count = cumulative[-1][1]
    rank = q * count
    lower_bound, lower_count = 0.0, 0.0
    for upper, c in cumulative:
        if c >= rank:
            if math.isinf(upper):
                return lower_bound  # like PromQL: the highest finite bound
            if c == lower_count:
                return upper
            return lower_bound + (upper - lower_bound) * (rank - lower_count) / (c - lower_count)
        lower_bound, lower_count = upper, c
    return lower_bound


def bucket_bounds(q: float, cumulative: list[tuple[float, float]]) -> tuple[float, float] | None:
    """The (lower, upper) bounds of the bucket that holds quantile ``q``."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower = 0.0
    for upper, c in cumulative:
        if c >= rank:
            return lower, upper
        lower = upper
    return lower, math.inf


def mean(samples: Samples, histogram: str, **want: str) -> float | None:
    count = total(samples, f"{histogram}_count", **want)
    return total(samples, f"{histogram}_sum", **want) / count if count else None


@dataclass
class ServerView:
    """What the gateway recorded for one model and precision in a window (seconds -> ms)."""

    requests: int
    by_status: dict[str, int]
    p50_ms: float | None
    p99_ms: float | None
    p50_bucket_ms: tuple[float, float] | None
    mean_ms: float | None
    queue_mean_ms: float | None
    upstream_mean_ms: float | None
    batch_mean: float | None

    def to_dict(self) -> dict[str, object]:
        return {
            "requests": self.requests,
            "by_status": self.by_status,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "p50_bucket_ms": list(self.p50_bucket_ms) if self.p50_bucket_ms else None,
            "mean_ms": self.mean_ms,
            "queue_mean_ms": self.queue_mean_ms,
            "upstream_mean_ms": self.upstream_mean_ms,
            "batch_mean": self.batch_mean,
        }


def _ms(x: float | None) -> float | None:
    return None if x is None else x * 1000.0


def server_view(window: Samples, model: str, precision: str) -> ServerView:
    sel = {"model": model, "precision": precision}
    e2e = buckets(window, E2E, **sel)
    bounds = bucket_bounds(0.5, e2e)
    return ServerView(
        requests=round(total(window, REQUESTS, **sel)),
        by_status={k: round(v) for k, v in by_label(window, REQUESTS, "status", **sel).items()},
        p50_ms=_ms(quantile(0.5, e2e)),
        p99_ms=_ms(quantile(0.99, e2e)),
        p50_bucket_ms=(bounds[0] * 1000.0, bounds[1] * 1000.0) if bounds else None,
        mean_ms=_ms(mean(window, E2E, **sel)),
        queue_mean_ms=_ms(mean(window, QUEUE, **sel)),
        upstream_mean_ms=_ms(mean(window, UPSTREAM, **sel)),
        batch_mean=mean(window, BATCH, **sel),
    )


# ---- decoder LLMs (LLM_CONTRACT names; server/metrics.py) ------------------------------------
LLM_TTFT = "precision_serve_llm_time_to_first_token_seconds"
LLM_ITL = "precision_serve_llm_inter_token_latency_seconds"
LLM_TOKENS = "precision_serve_llm_output_tokens_sum"
LLM_REQUESTS = "precision_serve_llm_requests_finished_total"


@dataclass
class LlmServerView:
    """What the gateway recorded for one LLM variant in a window (seconds -> ms).

    ``busy_s``: the sum over requests of TTFT (arrival -> first token, queueing included) plus
    the sum of every later token's inter-token latency, i.e. the seconds requests spent inside
    the gateway from arrival to their last token (what :func:`loadtest.llm_report.client_bound`
    compares with the users' wall-clock time)."""

    requests: int
    by_finish: dict[str, int]
    generated_tokens: int
    ttft_p50_ms: float | None
    ttft_mean_ms: float | None
    itl_p50_ms: float | None
    itl_mean_ms: float | None
    busy_s: float

    def to_dict(self) -> dict[str, object]:
        return dict(vars(self))


def llm_server_view(window: Samples, model: str, precision: str) -> LlmServerView:
    sel = {"model": model, "precision": precision}
    ttft, itl = buckets(window, LLM_TTFT, **sel), buckets(window, LLM_ITL, **sel)
    busy = total(window, f"{LLM_TTFT}_sum", **sel) + total(window, f"{LLM_ITL}_sum", **sel)
    return LlmServerView(
        requests=round(total(window, LLM_REQUESTS, **sel)),
        by_finish={
            k: round(v) for k, v in by_label(window, LLM_REQUESTS, "finish_reason", **sel).items()
        },
        generated_tokens=round(total(window, LLM_TOKENS, **sel)),
        ttft_p50_ms=_ms(quantile(0.5, ttft)),
        ttft_mean_ms=_ms(mean(window, LLM_TTFT, **sel)),
        itl_p50_ms=_ms(quantile(0.5, itl)),
        itl_mean_ms=_ms(mean(window, LLM_ITL, **sel)),
        busy_s=busy,
    )
