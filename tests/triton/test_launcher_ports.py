"""The ports the launcher picks for a Triton started on port 0 (no server started: the OS's
port allocation is replaced by one that hands a released port out again at once, as Linux may)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import ClassVar

import pytest

from server.launcher import tritonserver
from server.launcher.tritonserver import TritonOptions, TritonServer


class _ReusingSocket:
    """bind(port 0) gets the lowest port no open socket holds; close releases it."""

    held: ClassVar[set[int]] = set()

    def __init__(self) -> None:
        self.port: int | None = None

    def bind(self, address: tuple[str, int]) -> None:
        self.port = next(p for p in itertools.count(40000) if p not in self.held)
        self.held.add(self.port)

    def getsockname(self) -> tuple[str, int]:
        assert self.port is not None
        return ("127.0.0.1", self.port)

    def close(self) -> None:
        self.held.discard(self.port)  # type: ignore[arg-type]

    def __enter__(self) -> _ReusingSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.mark.parametrize(
    ("asked", "picked"),
    [((0, 0, 0), 3), ((9001, 0, 0), 2), ((0, 0, 9002), 2), ((9001, 9000, 9002), 0)],
)
def test_ports_picked_for_triton_are_distinct_even_when_the_os_reuses_ports(
    monkeypatch: pytest.MonkeyPatch, asked: tuple[int, int, int], picked: int
) -> None:
    monkeypatch.setattr(tritonserver.socket, "socket", _ReusingSocket)
    grpc, http, metrics = asked
    server = TritonServer(
        TritonOptions(repository=Path("."), grpc_port=grpc, http_port=http, metrics_port=metrics)
    )
    server._pick_ports()
    ports = (server.grpc_port, server.http_port, server.metrics_port)
    assert len(set(ports)) == 3, ports
    assert [p for p, a in zip(ports, asked, strict=True) if a] == [a for a in asked if a]
    assert sum(p >= 40000 for p in ports) == picked
    assert _ReusingSocket.held == set()  # every probe socket was closed
