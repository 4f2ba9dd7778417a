"""Triton's own clients against the gateway as a drop-in: statistics, streaming, model control,
server metadata - through tritonclient (gRPC, gRPC aio, HTTP). See docs/gateway.md "Triton
protocol coverage". One gateway subprocess (tiny model: fp32/fp16/int8) per module, plus private
ones for model control.
"""

from __future__ import annotations

import asyncio
import copy
import json
import queue
import shutil
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc
from tritonclient.utils import InferenceServerException

from common.model_repository import load_manifests, read_config, write_config
from server.dataplane.extensions import EXTENSIONS
from server.runtime.runner import GatewayProcess
from tests.server.conftest import copy_repository, ort_outputs, rows

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


def test_version_answers_are_triton_s_for_clients_that_omit_the_version(gateway):
    """What perf_analyzer asks without ``-x``: metadata versions, the config's version policy,
    readiness with an empty version."""
    g = grpcclient.InferenceServerClient(gateway.grpc_url)
    h = httpclient.InferenceServerClient(gateway.http_url)
    for name in ("tiny", "tiny_int8"):
        assert list(g.get_model_metadata(name).versions) == ["1"]
        assert h.get_model_metadata(name)["versions"] == ["1"]
        assert g.get_model_config(name).config.version_policy.latest.num_versions == 1
        policy = h.get_model_config(name)["version_policy"]
        assert policy == {"latest": {"num_versions": 1}}
        assert g.is_model_ready(name, "") and g.is_model_ready(name, "1")
        assert h.is_model_ready(name, "") and h.is_model_ready(name, "1")


def test_server_metadata_lists_exactly_the_implemented_extensions(gateway):
    g = grpcclient.InferenceServerClient(gateway.grpc_url)
    h = httpclient.InferenceServerClient(gateway.http_url)
    assert list(g.get_server_metadata().extensions) == list(EXTENSIONS)
    assert h.get_server_metadata()["extensions"] == list(EXTENSIONS)
    assert {"statistics", "model_repository", "model_configuration"} <= set(EXTENSIONS)
    assert "cuda_shared_memory" not in EXTENSIONS


# ---- a gateway in explicit model control, fp32 held back by its batching delay ----------------
SLOW_DELAY_US = 300_000  # tiny_fp32 waits this long for a fuller batch: it completes last


def _slow_fp32(repo: Path) -> None:
    cfg = read_config(repo / "tiny_fp32")
    cfg.dynamic_batching.max_queue_delay_microseconds = SLOW_DELAY_US
    write_config(repo / "tiny_fp32", cfg)


@pytest.fixture(scope="module")
def explicit_gateway(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory):
    repo = copy_repository(tiny_repository, tmp_path_factory.mktemp("dropin") / "repo")
    _slow_fp32(repo)
    with GatewayProcess(
        repo, extra_args=["--model-control", "explicit", "--upstream", "embedded?threads=1"]
    ) as gw:
        yield gw


# ---- streaming --------------------------------------------------------------------------------
def _bad_input(module=grpcclient):
    inp = module.InferInput("x", [1, 16], "INT32")
    inp.set_data_from_numpy(np.zeros((1, 16), np.int32))
    return inp


def test_stream_answers_in_request_order_and_continues_after_a_bad_request(
    explicit_gateway, tiny_repository
):
    client = grpcclient.InferenceServerClient(explicit_gateway.grpc_url)
    answers: queue.Queue = queue.Queue()
    x = rows(1, seed=7)
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        # fp32 (first) is held back by its batching delay, the others finish at once:
        # Triton answers a non-decoupled model's stream in request order all the same
        client.async_stream_infer("tiny", [_grpc_input(x)], request_id="slow")
        client.async_stream_infer("tiny", [_bad_input()], request_id="bad")
        client.async_stream_infer(
            "tiny", [_grpc_input(x)], request_id="p16", parameters={"precision": "fp16"}
        )
        client.async_stream_infer("tiny_int8", [_grpc_input(x)], request_id="v8")
        got = [answers.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
    (slow, e0), (none, bad), (p16, e2), (v8, e3) = got
    assert e0 is None and e2 is None and e3 is None and none is None
    assert "input 'x'" in bad.message() and "FP32" in bad.message() and "INT32" in bad.message()
    for result, rid, precision in (
        (slow, "slow", "fp32"),
        (p16, "p16", "fp16"),
        (v8, "v8", "int8"),
    ):
        response = result.get_response()
        assert response.id == rid
        assert response.parameters["precision"].string_param == precision
        assert response.model_name == f"tiny_{precision}"
        want = ort_outputs(tiny_repository, precision, x)
        np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-5, atol=1e-6)


def test_stream_through_grpc_aio(explicit_gateway):
    async def requests():
        yield {
            "model_name": "tiny_fp16",
            "inputs": [_grpc_input(rows(2), aioclient)],
            "request_id": "1",
        }
        yield {"model_name": "nope", "inputs": [_grpc_input(rows(1), aioclient)], "request_id": "2"}
        yield {
            "model_name": "tiny_int8",
            "inputs": [_grpc_input(rows(1), aioclient)],
            "request_id": "3",
        }

    async def run():
        client = aioclient.InferenceServerClient(explicit_gateway.grpc_url)
        try:
            return [item async for item in client.stream_infer(requests())]
        finally:
            await client.close()

    (r1, e1), (r2, e2), (r3, e3) = asyncio.run(run())
    assert e1 is None and r1.get_response().id == "1" and r1.as_numpy("logits").shape == (2, 4)
    assert r2 is None and e2.message().startswith("Request for unknown model: 'nope' is not found")
    assert e3 is None and r3.get_response().parameters["precision"].string_param == "int8"


def test_stream_error_is_triton_shaped_error_message_with_the_request_id(explicit_gateway):
    def requests():
        bad = pb.ModelInferRequest(model_name="tiny_int8", id="broken")
        bad.inputs.add(name="x", datatype="FP32", shape=[1, 16])
        bad.raw_input_contents.append(b"\x00" * 8)  # 8 bytes for 64
        yield bad
        good = pb.ModelInferRequest(model_name="tiny_int8", id="fine")
        good.inputs.add(name="x", datatype="FP32", shape=[1, 16])
        good.raw_input_contents.append(rows(1).tobytes())
        yield good

    with grpc.insecure_channel(explicit_gateway.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        first, second = list(stub.ModelStreamInfer(requests(), timeout=30))
    assert first.error_message.startswith(
        "[request id: broken] input byte size mismatch for input 'x' for model 'tiny_int8'. "
        "Expected 64, got 8"
    )
    assert first.infer_response.id == "broken"
    assert not first.infer_response.outputs
    assert second.error_message == "" and second.infer_response.id == "fine"
    assert second.infer_response.parameters["precision"].string_param == "int8"


# ---- model control ----------------------------------------------------------------------------
def _index(gw, ready: bool = False) -> dict[str, tuple[str, str]]:
    with grpc.insecure_channel(gw.grpc_url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=ready), timeout=10)
    return {m.name: (m.state, m.reason) for m in reply.models}


def _http_index(gw, ready: bool) -> dict[str, str]:
    req = urllib.request.Request(
        f"http://{gw.http_url}/v2/repository/index",
        data=json.dumps({"ready": ready}).encode(),
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return {m["name"]: m["state"] for m in json.loads(resp.read())}


def test_model_control_none_refuses_load_and_unload_as_triton_does(gateway):
    g = grpcclient.InferenceServerClient(gateway.grpc_url)
    h = httpclient.InferenceServerClient(gateway.http_url)
    for call in (g.load_model, g.unload_model, h.load_model, h.unload_model):
        with pytest.raises(InferenceServerException, match="explicit model load / unload is not"):
            call("tiny_int8")
    with pytest.raises(InferenceServerException) as info:
        g.unload_model("tiny")
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    assert g.is_model_ready("tiny_int8")  # nothing was unloaded
    assert _index(gateway)["tiny_int8"] == ("READY", "")


def _precision_of(client, model: str, precision: str | None = None) -> str:
    params = {"precision": precision} if precision else None
    result = client.infer(model, [_grpc_input(rows(1))], parameters=params)
    return result.get_response().parameters["precision"].string_param


def test_unload_makes_routing_fall_back_and_load_brings_the_variant_back(explicit_gateway):
    gw = explicit_gateway
    g = grpcclient.InferenceServerClient(gw.grpc_url)
    h = httpclient.InferenceServerClient(gw.http_url)
    assert _precision_of(g, "tiny", "int8") == "int8"
    g.unload_model("tiny_int8")
    try:
        assert not g.is_model_ready("tiny_int8") and not h.is_model_ready("tiny_int8")
        assert g.is_server_ready()  # an unloaded model is not expected up
        # asked for int8, served by the next precision of the fallback chain, which says so
        response = g.infer("tiny", [_grpc_input(rows(1))], parameters={"precision": "int8"})
        params = response.get_response().parameters
        assert params["precision"].string_param == "fp16"
        assert params["fallback_from"].string_param == "int8"
        inp = httpclient.InferInput("x", [1, 16], "FP32")
        inp.set_data_from_numpy(rows(1))
        doc = h.infer("tiny", [inp], parameters={"precision": "int8"}).get_response()
        assert doc["parameters"] == {"precision": "fp16", "fallback_from": "int8"}
        with pytest.raises(InferenceServerException, match="tiny_int8"):
            g.infer("tiny_int8", [_grpc_input(rows(1))])
        assert _index(gw)["tiny_int8"] == ("UNAVAILABLE", "unloaded")
        assert "tiny_int8" not in _index(gw, ready=True)  # the ready filter
        ready = _http_index(gw, ready=True)
        assert "tiny_int8" not in ready and ready["tiny_fp16"] == "READY"
        assert _http_index(gw, ready=False)["tiny_int8"] == "UNAVAILABLE"
    finally:
        h.load_model("tiny_int8")
    assert g.is_model_ready("tiny_int8") and _index(gw)["tiny_int8"] == ("READY", "")
    response = g.infer("tiny", [_grpc_input(rows(1))], parameters={"precision": "int8"})
    params = response.get_response().parameters
    assert params["precision"].string_param == "int8" and "fallback_from" not in params


def test_logical_name_unloads_and_loads_all_its_variants_through_grpc_aio(explicit_gateway):
    async def run():
        client = aioclient.InferenceServerClient(explicit_gateway.grpc_url)
        try:
            await client.unload_model("tiny")
            down = _index(explicit_gateway)
            # as Triton: a model unloaded on purpose does not make the server unready
            server_ready = await client.is_server_ready()
            model_ready = await client.is_model_ready("tiny")
            await client.load_model("tiny")
            return down, (server_ready, model_ready), await client.is_model_ready("tiny")
        finally:
            await client.close()

    down, (server_ready, model_ready), ready_again = asyncio.run(run())
    assert server_ready and not model_ready
    assert down == {
        n: ("UNAVAILABLE", "unloaded") for n in ("tiny", "tiny_fp32", "tiny_fp16", "tiny_int8")
    }
    assert ready_again
    assert set(_index(explicit_gateway, ready=True)) == {
        "tiny",
        "tiny_fp32",
        "tiny_fp16",
        "tiny_int8",
    }


def test_load_of_an_unknown_name_or_a_config_override_is_a_clear_error(explicit_gateway):
    g = grpcclient.InferenceServerClient(explicit_gateway.grpc_url)
    # Triton's "failed to load" (NVIDIA's simple_*_model_control.py check it), then why
    with pytest.raises(InferenceServerException) as info:
        g.load_model("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"
    assert info.value.message().startswith(
        "failed to load 'nope', Request for unknown model: 'nope' is not found"
    )
    h = httpclient.InferenceServerClient(explicit_gateway.http_url)
    with pytest.raises(InferenceServerException) as info:
        h.load_model("tiny_int8", config='{"max_batch_size": 4}')
    assert info.value.message().startswith("failed to load 'tiny_int8', load parameters")
    assert "not supported" in info.value.message()


def _add_variant(repo: Path, source: str, precision: str) -> str:
    """What the builder leaves behind for a new precision: its folder and a manifest entry
    (here a copy of ``source``'s files under the new name)."""
    manifest = load_manifests(repo)["tiny"]
    name = f"tiny_{precision}"
    shutil.copytree(repo / f"tiny_{source}", repo / name)
    cfg = read_config(repo / name)
    cfg.name = name
    write_config(repo / name, cfg)
    record = copy.deepcopy(manifest.variants[source])
    record.precision, record.triton_name = precision, name
    record.file = f"{name}/1/model.onnx"
    manifest.variants[precision] = record
    manifest.save(repo)
    return name


def test_a_variant_added_after_start_up_is_served_once_loaded(repo_copy, tiny_repository):
    with GatewayProcess(repo_copy, extra_args=["--model-control", "explicit"]) as gw:
        g = grpcclient.InferenceServerClient(gw.grpc_url)
        name = _add_variant(repo_copy, "fp32", "bf16")
        assert name not in _index(gw)  # not known until loaded
        with pytest.raises(InferenceServerException, match="no precision 'bf16'"):
            _precision_of(g, "tiny", "bf16")
        g.load_model(name)
        assert _index(gw)[name] == ("READY", "")
        x = rows(2, seed=9)
        result = g.infer(name, [_grpc_input(x)])
        assert result.get_response().model_name == name
        want = ort_outputs(tiny_repository, "fp32", x)
        np.testing.assert_allclose(result.as_numpy("logits"), want, rtol=1e-5, atol=1e-6)
        assert _precision_of(g, "tiny", "bf16") == "bf16"
        (stats,) = g.get_inference_statistics(name).model_stats
        assert stats.inference_stats.success.count == 2


def test_explicit_model_control_with_several_workers_is_refused_in_one_line(
    tiny_repository, capsys
):
    from server.cli import main

    args = ["--repository", str(tiny_repository), "--workers", "2", "--model-control", "explicit"]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["precision-serve: error: --model-control explicit needs --workers 1"]


def test_load_and_unload_need_the_bearer_token_when_one_is_set(tiny_repository):
    args = ["--model-control", "explicit"]
    env = {"PRECISION_SERVE_AUTH_TOKEN": "s3cret"}
    with GatewayProcess(tiny_repository, extra_args=args, env=env) as gw:
        g = grpcclient.InferenceServerClient(gw.grpc_url)
        h = httpclient.InferenceServerClient(gw.http_url)
        with pytest.raises(InferenceServerException, match="bearer token") as info:
            g.unload_model("tiny_int8")
        assert info.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException, match="bearer token"):
            h.unload_model("tiny_int8")
        assert g.is_model_ready("tiny_int8")  # untouched
        token = {"authorization": "Bearer s3cret"}
        h.unload_model("tiny_int8", headers=token)
        assert not g.is_model_ready("tiny_int8")
        g.load_model("tiny_int8", headers=token)
        assert g.is_model_ready("tiny_int8")
