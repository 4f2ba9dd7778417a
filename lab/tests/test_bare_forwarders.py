"""The benchmark's forwarding floors (lab/floors/bare_server.py ``forward`` and ``forward-http``)
against a real Triton: the same answers as Triton direct, under concurrency, and a failed call
fails the request without taking the forwarder down."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest

from bench import clients
from common.model_repository import load_manifests
from lab.floors.bare_server import BareServer
from tests.triton.conftest import StartTriton

pytestmark = pytest.mark.integration


async def _concurrent(url: str, payloads: list[bytes]) -> list[bytes]:
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.unary_unary(
            clients.METHOD, request_serializer=None, response_deserializer=None
        )
        return list(await asyncio.gather(*(call(p, timeout=30) for p in payloads)))


def test_both_forwarders_answer_as_triton(tiny_repository: Path, start_triton: StartTriton) -> None:
    name = load_manifests(tiny_repository)["tiny"].variants["fp32"].triton_name
    triton = start_triton(tiny_repository)
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.normal(size=(1 + i % 3, 16)).astype(np.float32)} for i in range(24)]
    payloads = [clients.infer_request_bytes(name, f) for f in feeds]
    want = [clients.decode_response(clients.grpc_call(triton.grpc_url, p))[0] for p in payloads]
    for mode, upstream in (("forward", triton.grpc_url), ("forward-http", triton.http_url)):
        with BareServer(mode, forward=upstream) as fwd:
            got = asyncio.run(_concurrent(fwd.grpc_url, payloads))
            for i, reply in enumerate(got):
                outputs, _ = clients.decode_response(reply)
                assert outputs.keys() == want[i].keys(), mode
                for key, value in want[i].items():
                    np.testing.assert_array_equal(outputs[key], value, err_msg=f"{mode} #{i}")
            # an unknown model fails that call; the forwarder still serves the next one
            with pytest.raises(grpc.RpcError):
                clients.grpc_call(fwd.grpc_url, clients.infer_request_bytes("nope", feeds[0]))
            outputs, _ = clients.decode_response(clients.grpc_call(fwd.grpc_url, payloads[0]))
            np.testing.assert_array_equal(
                outputs[next(iter(want[0]))], next(iter(want[0].values()))
            )
