"""Upstreams: what runs a variant (see server/upstreams/base.py for the protocol)."""

from server.upstreams.base import (
    Upstream,
    UpstreamSettings,
    UpstreamUnavailable,
    create_upstream,
    parse_upstream_spec,
    register_upstream,
    report_ready,
)

__all__ = [
    "Upstream",
    "UpstreamSettings",
    "UpstreamUnavailable",
    "create_upstream",
    "parse_upstream_spec",
    "register_upstream",
    "report_ready",
]
