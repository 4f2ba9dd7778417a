"""Fixtures for the load-test and observability tests (the Triton ones come from tests/triton)."""

from __future__ import annotations

import pytest

from tests.helpers import skip_or_fail
from tests.loadtest.promserver import find_prometheus
from tests.triton.conftest import start_triton, triton_distribution  # noqa: F401 (fixtures)


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    binary = find_prometheus()
    if binary is None:
        skip_or_fail("the prometheus binary is not installed (Debian package prometheus)")
    return binary  # type: ignore[return-value]
