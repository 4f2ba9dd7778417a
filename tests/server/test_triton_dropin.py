"""Triton's own clients against the gateway as a drop-in: statistics, streaming, model control,
server metadata - through tritonclient (gRPC, gRPC aio, HTTP). See docs/gateway.md "Triton
protocol coverage". One gateway subprocess (tiny model: fp32/fp16/int8) per module, plus private
ones for model control.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient

from server.extensions import EXTENSIONS
from tests.server.conftest import rows

pytestmark = pytest.mark.integration


def _grpc_input(x: np.ndarray, module=grpcclient):
    inp = module.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def _successes(stats) -> dict[str, int]:
    return {s.name: s.inference_stats.success.count for s in stats.model_stats}


# ---- statistics -------------------------------------------------------------------------------
def test_statistics_of_a_logical_model_is_one_entry_summed_over_its_variants(gateway):
    g = grpcclient.InferenceServerClient(gateway.grpc_url)
    h = httpclient.InferenceServerClient(gateway.http_url)
    before = _successes(g.get_inference_statistics())
    g.infer("tiny", [_grpc_input(rows(2))])  # fp32 by the default policy
    g.infer("tiny", [_grpc_input(rows(1))], parameters={"precision": "int8"})
    g.infer("tiny_fp16", [_grpc_input(rows(3))])

    (entry,) = g.get_inference_statistics("tiny").model_stats
    assert (entry.name, entry.version) == ("tiny", "1")
    assert entry.inference_stats.success.count - before["tiny"] == 3
    # each variant keeps its own entry under its own name
    for name, n in (("tiny_fp32", 1), ("tiny_int8", 1), ("tiny_fp16", 1)):
        (own,) = g.get_inference_statistics(name).model_stats
        assert own.name == name and own.inference_stats.success.count - before[name] == n
    # without a name: every variant and every logical model, once each
    everything = g.get_inference_statistics().model_stats
    assert sorted((s.name, s.version) for s in everything) == sorted(
        (n, "1") for n in ("tiny", "tiny_fp32", "tiny_fp16", "tiny_int8")
    )
    logical = next(s for s in everything if s.name == "tiny")
    parts = [s for s in everything if s.name.startswith("tiny_")]
    assert logical.inference_stats.success.count == sum(
        s.inference_stats.success.count for s in parts
    )
    assert logical.inference_count == sum(s.inference_count for s in parts)
    # perf_analyzer finds the measured version by the queue count: it moves with the requests
    assert entry.inference_stats.queue.count == entry.inference_stats.success.count
    # HTTP: the same single entry, counts as JSON numbers
    (doc,) = h.get_inference_statistics("tiny")["model_stats"]
    assert (doc["name"], doc["version"]) == ("tiny", "1")
    assert doc["inference_stats"]["success"]["count"] >= entry.inference_stats.success.count
    assert isinstance(doc["inference_count"], int)


def test_statistics_through_grpc_aio(gateway):
    async def run():
        client = aioclient.InferenceServerClient(gateway.grpc_url)
        try:
            await client.infer("tiny_int8", [_grpc_input(rows(1), aioclient)])
            return await client.get_inference_statistics("tiny")
        finally:
            await client.close()

    stats = asyncio.run(run())
    assert [s.name for s in stats.model_stats] == ["tiny"]
    assert stats.model_stats[0].inference_stats.success.count >= 1


def test_server_metadata_lists_exactly_the_implemented_extensions(gateway):
    g = grpcclient.InferenceServerClient(gateway.grpc_url)
    h = httpclient.InferenceServerClient(gateway.http_url)
    assert list(g.get_server_metadata().extensions) == list(EXTENSIONS)
    assert h.get_server_metadata()["extensions"] == list(EXTENSIONS)
    assert {"statistics", "model_repository", "model_configuration"} <= set(EXTENSIONS)
    assert "cuda_shared_memory" not in EXTENSIONS
