"""The Envoy front's reply codes under the gateway's names (``ok`` or the gRPC code name), and
Envoy's latency buckets equal to the gateway's (one histogram_quantile over both series)."""

from __future__ import annotations

import pytest

from server.front.config import stats_config
from server.front.metrics import grpc_code_name, http_code_name
from server.metrics import LATENCY_BUCKETS


@pytest.mark.parametrize(
    ("code", "name"),
    [(0, "ok"), (3, "INVALID_ARGUMENT"), (5, "NOT_FOUND"), (14, "UNAVAILABLE"), (99, "UNKNOWN")],
)
def test_grpc_codes_are_named_as_the_gateway_names_them(code: int, name: str) -> None:
    assert grpc_code_name(code) == name


@pytest.mark.parametrize(
    ("code", "name"),
    [
        (200, "ok"),
        (400, "INVALID_ARGUMENT"),
        (404, "NOT_FOUND"),
        (413, "RESOURCE_EXHAUSTED"),
        (429, "RESOURCE_EXHAUSTED"),
        (503, "UNAVAILABLE"),
        (504, "DEADLINE_EXCEEDED"),
        (418, "UNKNOWN"),
    ],
)
def test_http_codes_are_named_as_the_gateway_answers_them(code: int, name: str) -> None:
    assert http_code_name(code) == name


def test_envoy_latency_buckets_are_the_gateways_in_milliseconds() -> None:
    (setting,) = stats_config()["histogram_bucket_settings"]
    assert setting["buckets"] == [b * 1000 for b in LATENCY_BUCKETS]
    assert setting["match"]["safe_regex"]["regex"] == r"^cluster\..*\.upstream_rq_time$"
