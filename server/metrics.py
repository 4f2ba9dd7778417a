"""Prometheus metrics (prometheus-client, default registry), served on the metrics port.

Names, labels and units are documented in docs/metrics.md. ``model`` is the logical model for
request-level series and the variant (Triton name) for ``upstream_ready``. Label sets stay small:
precisions and status codes are short closed sets.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)

REQUESTS = Counter(
    "precision_serve_requests",
    "Inference requests by model, serving precision, protocol and status (ok or gRPC code name).",
    ["model", "precision", "protocol", "status"],
)
REQUEST_DURATION = Histogram(
    "precision_serve_request_duration_seconds",
    "End-to-end inference time inside the gateway (seconds).",
    ["model", "precision"],
    buckets=LATENCY_BUCKETS,
)
QUEUE_DURATION = Histogram(
    "precision_serve_queue_duration_seconds",
    "Time a request waited for a batch or a free worker (seconds).",
    ["model", "precision"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "precision_serve_upstream_duration_seconds",
    "Time of the engine run / upstream call that served a request (seconds).",
    ["model", "precision"],
    buckets=LATENCY_BUCKETS,
)
INFLIGHT = Gauge(
    "precision_serve_inflight_requests",
    "Inference requests currently being handled.",
    ["model"],
    multiprocess_mode="livesum",  # --workers: the sum over live workers
)
BATCH_SIZE = Histogram(
    "precision_serve_batch_size",
    "Rows per engine run after dynamic batching.",
    ["model", "precision"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
FALLBACKS = Counter(
    "precision_serve_fallbacks",
    "Requests served by another precision because the chosen one was not ready/unavailable.",
    ["model", "from_precision", "to_precision"],
)
ROUTING_DECISIONS = Counter(
    "precision_serve_routing_decisions",
    "Precision chosen for requests to a logical model, by the policy (or request/header).",
    ["model", "precision", "policy"],
)
SHADOW_COMPARISONS = Counter(
    "precision_serve_shadow_comparisons",
    "Shadow comparisons of a served variant against its reference, by top-1 agreement.",
    ["model", "precision", "reference", "top1_agree"],
)
SHADOW_COSINE = Histogram(
    "precision_serve_shadow_cosine",
    "Cosine similarity of served vs reference outputs (per request, flattened).",
    ["model", "precision", "reference"],
    buckets=(0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999, 1.0),
)
SHADOW_DROPPED = Counter(
    "precision_serve_shadow_dropped",
    "Shadow samples not compared, by reason: busy (too many in flight), unready, failed, invalid.",
    ["model", "reason"],
)
QUEUE_REJECTIONS = Counter(
    "precision_serve_queue_rejections",
    "Requests refused because a variant's batcher queue was full (max_queue_size).",
    ["model", "precision"],
)
UPSTREAM_READY = Gauge(
    "precision_serve_upstream_ready",
    "1 when the upstream can serve the variant, else 0.",
    ["upstream", "model"],
    multiprocess_mode="livemin",  # --workers: 1 only when every live worker can
)

# The speed figures auto ranks variants by (server/routing/retime.py): the manifest's, and where
# this host differs from the build host, the ones re-timed here at start-up.
VARIANT_SPEED = Gauge(
    "precision_serve_variant_speed_rows_per_second",
    "Variant throughput at its speed batch: source=manifest (build host) or retimed (this host).",
    ["model", "precision", "source"],
    multiprocess_mode="livemax",
)
VARIANT_LATENCY = Gauge(
    "precision_serve_variant_batch1_latency_seconds",
    "Variant batch-1 p50 latency: source=manifest (build host) or retimed (this host).",
    ["model", "precision", "source"],
    multiprocess_mode="livemax",
)

# The engine each variant runs on: the manifest's, and the one served in this process (they
# differ where the start-up re-check moved a variant to an engine that leads beyond noise here).
VARIANT_ENGINE = Gauge(
    "precision_serve_variant_engine",
    "1 for the engine of a variant: source=manifest (the builder's choice) or served (this "
    "process, after the re-timing's engine re-check).",
    ["model", "precision", "engine", "source"],
    multiprocess_mode="livemax",
)

HTTP_CONNECTIONS_REJECTED = Counter(
    "precision_serve_http_connections_rejected",
    "HTTP connections answered 503 and closed because --http-max-connections were open.",
)


class Children:
    """A metric's labelled children, bound once per label tuple (``.labels()`` costs a lock, a
    tuple and a dict lookup under it on every call; the hot path asks this cache instead)."""

    def __init__(self, metric: Counter | Gauge | Histogram) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


requests = Children(REQUESTS)  # (model, precision, protocol, status)
request_duration = Children(REQUEST_DURATION)  # (model, precision)
queue_duration = Children(QUEUE_DURATION)  # (model, precision)
upstream_duration = Children(UPSTREAM_DURATION)  # (model, precision)
inflight = Children(INFLIGHT)  # (model,)
batch_size = Children(BATCH_SIZE)  # (model, precision)
routing_decisions = Children(ROUTING_DECISIONS)  # (model, precision, policy)
variant_speed = Children(VARIANT_SPEED)  # (model, precision, source)
variant_latency = Children(VARIANT_LATENCY)  # (model, precision, source)
variant_engine = Children(VARIANT_ENGINE)  # (model, precision, engine, source)

# ---- the slo routing policy (server/routing/slo.py); one series per worker under --workers ----
SLO_SHARE = Gauge(
    "precision_serve_slo_share",
    "Share of the slo policy's traffic sent to each precision (0..1).",
    ["model", "precision"],
    multiprocess_mode="liveall",
)
SLO_OBJECTIVE = Gauge(
    "precision_serve_slo_objective_seconds",
    "The slo policy's p99 latency objective (seconds).",
    ["model"],
    multiprocess_mode="livemax",
)
SLO_BUDGET = Gauge(
    "precision_serve_slo_accuracy_budget",
    "The slo policy's accuracy budget (manifest accuracy_loss points).",
    ["model"],
    multiprocess_mode="livemax",
)
SLO_EXPECTED_LOSS = Gauge(
    "precision_serve_slo_expected_accuracy_loss",
    "Traffic-weighted manifest accuracy_loss of the slo policy's current mix (points).",
    ["model"],
    multiprocess_mode="liveall",
)
SLO_ESTIMATED_P99 = Gauge(
    "precision_serve_slo_estimated_p99_seconds",
    "The slo controller's p99 estimate of its last observation window (seconds).",
    ["model"],
    multiprocess_mode="liveall",
)
SLO_SHIFTS = Counter(
    "precision_serve_slo_shifts",
    "Shifts of the slo mix: up (towards faster variants) or down (towards more accurate).",
    ["model", "direction"],
)

# ---- decoder LLMs (server/dataplane/generation.py); docs/llm-serving.md ----
_TTFT_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
_ITL_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

LLM_TTFT = Histogram(
    "precision_serve_llm_time_to_first_token_seconds",
    "Time from a generation request's arrival to its first generated text (seconds).",
    ["model", "precision"],
    buckets=_TTFT_BUCKETS,
)
LLM_ITL = Histogram(
    "precision_serve_llm_inter_token_latency_seconds",
    "Time between generated tokens after the first (seconds, per token).",
    ["model", "precision"],
    buckets=_ITL_BUCKETS,
)
LLM_OUTPUT_TOKENS = Histogram(
    "precision_serve_llm_output_tokens",
    "Tokens generated per request.",
    ["model", "precision"],
    buckets=_TOKEN_BUCKETS,
)
LLM_PROMPT_TOKENS = Histogram(
    "precision_serve_llm_prompt_tokens",
    "Prompt tokens per generation request.",
    ["model", "precision"],
    buckets=_TOKEN_BUCKETS,
)
LLM_FINISHES = Counter(
    "precision_serve_llm_requests_finished",
    "Generation requests by how they ended: stop, length or cancelled (client went away).",
    ["model", "precision", "finish_reason"],
)
LLM_ACTIVE_SEQUENCES = Gauge(
    "precision_serve_llm_active_sequences",
    "Sequences generating now (embedded upstream), per variant.",
    ["model", "precision"],
    multiprocess_mode="livesum",
)
LLM_QUEUED = Gauge(
    "precision_serve_llm_queued_requests",
    "Generation requests waiting for a free sequence slot (embedded upstream), per variant.",
    ["model", "precision"],
    multiprocess_mode="livesum",
)

llm_ttft = Children(LLM_TTFT)  # (model, precision)
llm_itl = Children(LLM_ITL)  # (model, precision)
llm_output_tokens = Children(LLM_OUTPUT_TOKENS)  # (model, precision)
llm_prompt_tokens = Children(LLM_PROMPT_TOKENS)  # (model, precision)
llm_finishes = Children(LLM_FINISHES)  # (model, precision, finish_reason)
