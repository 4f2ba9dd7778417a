"""Fixtures for the Triton tests: the tritonserver from the nvidia-pytriton wheel, started on
OS-picked loopback ports with logs in the test's tmp folder, always stopped afterwards."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server.launcher.distribution import TritonDistribution, find_distribution
from server.launcher.errors import TritonNotInstalled
from server.launcher.tritonserver import TritonOptions, TritonServer
from tests.helpers import skip_or_fail


@pytest.fixture(scope="session")
def triton_distribution() -> TritonDistribution:
    try:
        return find_distribution()
    except TritonNotInstalled as e:
        skip_or_fail(str(e))
        raise


StartTriton = Callable[..., TritonServer]


@pytest.fixture
def start_triton(tmp_path: Path, triton_distribution: TritonDistribution) -> Iterator[StartTriton]:
    """``start_triton(repository, **TritonOptions fields)`` -> a started TritonServer."""
    servers: list[TritonServer] = []

    def start(repository: Path, **options: object) -> TritonServer:
        index = len(servers)
        fields: dict[str, object] = {
            "grpc_port": 0,
            "http_port": 0,
            "metrics_port": 0,
            "log_file": tmp_path / f"triton-{index}.log",
            "work_dir": tmp_path / f"triton-{index}",
            "startup_timeout": 90.0,
            **options,
        }
        opts = TritonOptions(repository=repository, **fields)  # type: ignore[arg-type]
        server = TritonServer(opts, triton_distribution)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
