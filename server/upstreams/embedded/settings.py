"""The embedded upstream's URL settings: ``--upstream embedded?threads=N&sequences=S&...``."""

from __future__ import annotations

from server.upstreams.base import QueryKey, UpstreamQuery, count


def positive(text: str) -> int:
    """A whole number >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError("must be >= 1")
    return value


QUERY = UpstreamQuery(
    {
        "threads": QueryKey(
            "threads",
            count,
            "intra-op threads per engine session (0: the engine decides); 1 lowers the CPU per "
            "request of tiny models, cuts a heavy model's throughput",
        ),
        "sequences": QueryKey(
            "llm_sequences",
            positive,
            "LLM variants: sequences generating at once per variant (each on its own thread, "
            "with its own KV cache; docs/llm-serving.md)",
        ),
        "queue": QueryKey(
            "llm_queue",
            count,
            "LLM variants: requests waiting for a sequence slot per variant; one more is refused "
            "(HTTP 503, gRPC UNAVAILABLE)",
        ),
        "max_tokens": QueryKey(
            "llm_max_tokens",
            positive,
            "LLM variants: the largest max_tokens a request may ask (more: 400)",
        ),
    }
)
