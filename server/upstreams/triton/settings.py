"""The Triton upstreams' URL settings: ``triton://H:P[,H:P...]?KEY=VALUE&...`` and
``triton+dns://NAME:PORT?KEY=VALUE&...`` (the same keys, plus ``interval``)."""

from __future__ import annotations

from server.upstreams.base import QueryKey, UpstreamQuery, seconds
from server.upstreams.triton.detach import MODES as CANCEL_MODES


def _cancel(text: str) -> bool:
    if text not in CANCEL_MODES:
        raise ValueError(f"must be one of {', '.join(CANCEL_MODES)}")
    return text == "propagate"


FRONTS = ("auto", "envoy", "python")


def _front(text: str) -> str:
    if text not in FRONTS:
        raise ValueError(f"must be one of {', '.join(FRONTS)}")
    return text


def _port(text: str) -> int:
    port = int(text)
    if not 0 < port <= 65535:
        raise ValueError("must be a port number, 1..65535")
    return port


def _positive(text: str) -> float:
    return seconds(text, inclusive=False)


KEYS = {
    "front": QueryKey(
        "front",
        _front,
        "envoy: Envoy listens on the public ports and sends inference straight to Triton, the "
        "gateway is the control plane behind it (docs/envoy.md); python: the gateway listens "
        "and forwards every request itself; auto: envoy, unless a replica runs tritonserver < "
        "2.53 (it can crash on cancelled calls, which Envoy passes on) and cancel=detach",
    ),
    "http": QueryKey(
        "http_port",
        _port,
        "the replicas' HTTP port: with the Envoy front, HTTP inference goes straight to it "
        "(0: through the gateway, which uses the gRPC port)",
    ),
    "cancel": QueryKey(
        "cancel_upstream",
        _cancel,
        "detach: a Triton call runs to its end when its client cancels or its deadline passes "
        "(tritonserver < 2.53 can crash on cancelled calls); propagate: cancel it",
        lambda propagate: "propagate" if propagate else "detach",
    ),
    "timeout_s": QueryKey(
        "default_timeout_s",
        _positive,
        "seconds a forwarded call may take when its client gave no deadline",
        lambda s: f"{s:g}",
    ),
}
# keys of earlier versions, refused with the reason
_MERGING_REMOVED = (
    "the gateway no longer merges forwarded requests; Triton's own dynamic batcher batches "
    "(docs/upstreams.md)"
)
REMOVED = {"merge": _MERGING_REMOVED, "merge_wait_ms": _MERGING_REMOVED}
QUERY = UpstreamQuery(KEYS, REMOVED)
DNS_QUERY = UpstreamQuery(
    {
        **KEYS,
        "interval": QueryKey(
            "resolve_interval_s",
            _positive,
            "seconds between resolutions of NAME (each answer is the replica set)",
            lambda s: f"{s:g}",
        ),
    },
    REMOVED,
)
