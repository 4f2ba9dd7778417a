"""Triton's system shared memory extension through tritonclient (gRPC, gRPC aio, HTTP): the
client side is ``tritonclient.utils.shared_memory`` unchanged, as against Triton.

One gateway subprocess (tiny model: fp32/fp16/int8) serves the module; each test makes its own
regions (unique keys) and unregisters them.
"""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm
from tritonclient.utils import InferenceServerException

from server.dataplane.security import SecurityOptions
from server.routing.options import RoutingOptions
from server.runtime.runner import GatewayProcess
from server.transports.options import ListenOptions, Ports
from tests.server.conftest import ort_outputs, rows

pytestmark = pytest.mark.integration

X_BYTES = 3 * 16 * 4  # rows(3): [3, 16] FP32
OUT_BYTES = 3 * 4 * 4  # logits [3, 4] FP32


@pytest.fixture(scope="module")
def gw(tiny_repository):
    with GatewayProcess(tiny_repository, ["--upstream", "embedded?threads=1"]) as g:
        yield g


@pytest.fixture
def regions(gw):
    """``make(name, byte_size)`` -> a client-side region with a unique key; destroyed after."""
    made = []

    def make(name: str, byte_size: int):
        key = f"/ps_test_{name}_{uuid.uuid4().hex[:8]}"
        handle = shm.create_shared_memory_region(name, key, byte_size, create_only=True)
        made.append(handle)
        return key, handle

    yield make
    grpcclient.InferenceServerClient(gw.grpc_url).unregister_system_shared_memory()
    for handle in made:
        shm.destroy_shared_memory_region(handle)


def _layout(regions, name: str):
    """One region: 16 bytes the registration skips, the input at 32, the output after a gap."""
    key, handle = regions(name, 16 + 32 + X_BYTES + 8 + OUT_BYTES + 8)
    x = rows(3, seed=7)
    shm.set_shared_memory_region(handle, [x], offset=16 + 32)
    # region-relative offsets (the region starts 16 bytes into the key's object)
    return key, handle, x, 32, 32 + X_BYTES + 8


def _code(e: InferenceServerException) -> str:
    return str(e.status())


def test_grpc_input_and_output_in_shared_memory_with_offsets(gw, regions, tiny_repository):
    key, handle, x, in_off, out_off = _layout(regions, "grpc_io")
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    client.register_system_shared_memory("grpc_io", key, out_off + OUT_BYTES, 16)
    inp = grpcclient.InferInput("x", [3, 16], "FP32")
    inp.set_shared_memory("grpc_io", X_BYTES, offset=in_off)
    out = grpcclient.InferRequestedOutput("logits")
    out.set_shared_memory("grpc_io", OUT_BYTES, offset=out_off)
    result = client.infer("tiny_fp32", [inp], outputs=[out])
    response = result.get_response()
    # metadata without data, as Triton answers (an empty raw entry per output)
    [meta] = response.outputs
    assert (meta.name, meta.datatype, list(meta.shape)) == ("logits", "FP32", [3, 4])
    assert list(response.raw_output_contents) == [b""]
    got = shm.get_contents_as_numpy(handle, np.float32, [3, 4], offset=16 + out_off)
    np.testing.assert_allclose(got, ort_outputs(tiny_repository, "fp32", x), rtol=1e-5, atol=1e-6)
    # an input in shared memory next to a normal one is also fine: output over the wire
    inp2 = grpcclient.InferInput("x", [3, 16], "FP32")
    inp2.set_shared_memory("grpc_io", X_BYTES, offset=in_off)
    plain = client.infer("tiny_fp32", [inp2])
    np.testing.assert_allclose(plain.as_numpy("logits"), got, rtol=1e-6)


def test_grpc_aio_logical_model_status_and_unregister(gw, regions, tiny_repository):
    key, handle, x, in_off, out_off = _layout(regions, "aio_io")
    key2, _ = regions("aio_other", 64)

    async def run():
        client = aioclient.InferenceServerClient(gw.grpc_url)
        try:
            await client.register_system_shared_memory("aio_io", key, out_off + OUT_BYTES, 16)
            await client.register_system_shared_memory("aio_other", key2, 64)
            inp = aioclient.InferInput("x", [3, 16], "FP32")
            inp.set_shared_memory("aio_io", X_BYTES, offset=in_off)
            out = aioclient.InferRequestedOutput("logits")
            out.set_shared_memory("aio_io", OUT_BYTES, offset=out_off)
            result = await client.infer(
                "tiny", [inp], outputs=[out], parameters={"precision": "int8"}
            )
            both = await client.get_system_shared_memory_status(as_json=True)
            await client.unregister_system_shared_memory("aio_other")
            one = await client.get_system_shared_memory_status(as_json=True)
            await client.unregister_system_shared_memory()
            none = await client.get_system_shared_memory_status(as_json=True)
            return result, both, one, none
        finally:
            await client.close()

    result, both, one, none = asyncio.run(run())
    assert result.get_response().model_name == "tiny_int8"
    got = shm.get_contents_as_numpy(handle, np.float32, [3, 4], offset=16 + out_off)
    np.testing.assert_allclose(got, ort_outputs(tiny_repository, "int8", x), rtol=1e-5, atol=1e-6)
    assert set(both["regions"]) == {"aio_io", "aio_other"}
    io = both["regions"]["aio_io"]
    assert (io["key"], int(io["offset"]), int(io["byte_size"])) == (
        key,
        16,
        out_off + OUT_BYTES,
    )
    assert set(one["regions"]) == {"aio_io"}
    assert not none.get("regions")


def test_http_input_and_output_in_shared_memory(gw, regions, tiny_repository):
    key, handle, x, in_off, out_off = _layout(regions, "http_io")
    client = httpclient.InferenceServerClient(gw.http_url)
    client.register_system_shared_memory("http_io", key, out_off + OUT_BYTES, 16)
    inp = httpclient.InferInput("x", [3, 16], "FP32")
    inp.set_shared_memory("http_io", X_BYTES, offset=in_off)
    out = httpclient.InferRequestedOutput("logits", binary_data=True)
    out.set_shared_memory("http_io", OUT_BYTES, offset=out_off)
    result = client.infer("tiny_fp16", [inp], outputs=[out])
    [meta] = result.get_response()["outputs"]
    assert meta["name"] == "logits" and meta["shape"] == [3, 4]
    assert "data" not in meta and "binary_data_size" not in meta.get("parameters", {})
    got = shm.get_contents_as_numpy(handle, np.float32, [3, 4], offset=16 + out_off)
    np.testing.assert_allclose(got, ort_outputs(tiny_repository, "fp16", x), rtol=1e-3, atol=1e-3)
    [status] = client.get_system_shared_memory_status("http_io")
    assert status["key"] == key and int(status["offset"]) == 16
    client.unregister_system_shared_memory("http_io")
    assert client.get_system_shared_memory_status() == []


def _grpc_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as e:
        call()
    return e.value


def test_bad_regions_are_invalid_argument_naming_the_region(gw, regions):
    key, _ = regions("bad_io", 256)
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    http = httpclient.InferenceServerClient(gw.http_url)
    client.register_system_shared_memory("bad_io", key, 256)

    def grpc_in(region: str, size: int, offset: int = 0):
        inp = grpcclient.InferInput("x", [3, 16], "FP32")
        inp.set_shared_memory(region, size, offset=offset)
        return lambda: client.infer("tiny_fp32", [inp])

    # out of bounds: offset + byte size past the region's 256 bytes
    e = _grpc_error(grpc_in("bad_io", X_BYTES, offset=128))
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"
    assert "'bad_io'" in e.message() and "'x'" in e.message() and "outside" in e.message()
    # not registered
    e = _grpc_error(grpc_in("nowhere", X_BYTES))
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"
    assert "'nowhere'" in e.message() and "not registered" in e.message()
    # byte size that does not match the shape
    e = _grpc_error(grpc_in("bad_io", 100))
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"
    assert "'bad_io'" in e.message() and "expected 192" in e.message()
    # an output bigger than its slice: names the output and the region
    inp = grpcclient.InferInput("x", [3, 16], "FP32")
    inp.set_data_from_numpy(rows(3))
    out = grpcclient.InferRequestedOutput("logits")
    out.set_shared_memory("bad_io", 8)
    e = _grpc_error(lambda: client.infer("tiny_fp32", [inp], outputs=[out]))
    assert _code(e) == "StatusCode.INVALID_ARGUMENT"
    assert "'logits'" in e.message() and "'bad_io'" in e.message()
    # HTTP: 400 with the same message
    hin = httpclient.InferInput("x", [3, 16], "FP32")
    hin.set_shared_memory("nowhere", X_BYTES)
    with pytest.raises(InferenceServerException, match="'nowhere'") as he:
        http.infer("tiny_fp32", [hin])
    assert he.value.status() == "400"
    # the gateway still serves after all of that
    ok = grpcclient.InferInput("x", [3, 16], "FP32")
    ok.set_data_from_numpy(rows(3))
    assert client.infer("tiny_fp32", [ok]).as_numpy("logits").shape == (3, 4)


def test_registration_errors_as_triton(gw, regions):
    key, _ = regions("reg", 128)
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    http = httpclient.InferenceServerClient(gw.http_url)
    client.register_system_shared_memory("reg", key, 128)
    e = _grpc_error(lambda: client.register_system_shared_memory("reg", key, 128))
    assert _code(e) == "StatusCode.ALREADY_EXISTS" and "'reg'" in e.message()
    with pytest.raises(InferenceServerException, match="already") as he:
        http.register_system_shared_memory("reg", key, 128)
    assert he.value.status() == "400"
    for bad_key in ("/ps_test_no_such_key", "../../etc/passwd"):
        e = _grpc_error(lambda k=bad_key: client.register_system_shared_memory("r2", k, 8))
        assert _code(e) == "StatusCode.INVALID_ARGUMENT" and repr(bad_key) in e.message()
    e = _grpc_error(lambda: client.register_system_shared_memory("r3", key, 64, offset=100))
    assert _code(e) == "StatusCode.INVALID_ARGUMENT" and "'r3'" in e.message()
    e = _grpc_error(lambda: client.get_system_shared_memory_status("r2"))
    assert _code(e) == "StatusCode.NOT_FOUND"
    with pytest.raises(InferenceServerException) as he:
        http.get_system_shared_memory_status("r2")
    assert he.value.status() == "404"
    assert set(client.get_system_shared_memory_status(as_json=True)["regions"]) == {"reg"}


def test_cuda_shared_memory_is_unimplemented_naming_system_shared_memory(gw):
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    http = httpclient.InferenceServerClient(gw.http_url)
    for call in (
        lambda: client.get_cuda_shared_memory_status(),
        lambda: client.register_cuda_shared_memory("c", b"aGFuZGxl", 0, 64),
    ):
        e = _grpc_error(call)
        assert _code(e) == "StatusCode.UNIMPLEMENTED" and "system shared memory" in e.message()
    for call in (
        lambda: http.get_cuda_shared_memory_status(),
        lambda: http.register_cuda_shared_memory("c", b"aGFuZGxl", 0, 64),
    ):
        with pytest.raises(InferenceServerException, match="system shared memory") as he:
            call()
        assert he.value.status() == "501"
    # nothing can be registered, so unregistering is done (perf_analyzer's clean-up relies on it)
    client.unregister_cuda_shared_memory()
    http.unregister_cuda_shared_memory()


def test_server_metadata_lists_system_shared_memory(gw):
    grpc_ext = grpcclient.InferenceServerClient(gw.grpc_url).get_server_metadata().extensions
    http_ext = httpclient.InferenceServerClient(gw.http_url).get_server_metadata()["extensions"]
    assert "system_shared_memory" in grpc_ext and "system_shared_memory" in http_ext
    assert "cuda_shared_memory" not in grpc_ext and list(grpc_ext) == list(http_ext)


def test_workers_refuse_registration_naming_the_option(tiny_repository, regions):
    from server.app import ServeOptions
    from server.runtime.runner import InProcessGateway

    key, _ = regions("w", 64)
    options = ServeOptions(
        RoutingOptions(tiny_repository), listen=ListenOptions(ports=Ports(0, 0, 0)), worker=True
    )
    with InProcessGateway(options) as g:
        client = grpcclient.InferenceServerClient(g.grpc_url)
        e = _grpc_error(lambda: client.register_system_shared_memory("w", key, 64))
        assert _code(e) == "StatusCode.UNIMPLEMENTED" and "--workers 1" in e.message()


def test_shared_memory_calls_need_the_bearer_token(tiny_repository, regions):
    from server.app import ServeOptions
    from server.runtime.runner import InProcessGateway

    key, _ = regions("auth", 64)
    options = ServeOptions(
        RoutingOptions(tiny_repository),
        listen=ListenOptions(ports=Ports(0, 0, 0)),
        security=SecurityOptions(auth_token="s3cret"),
    )
    with InProcessGateway(options) as g:
        client = grpcclient.InferenceServerClient(g.grpc_url)
        http = httpclient.InferenceServerClient(g.http_url)
        e = _grpc_error(lambda: client.register_system_shared_memory("auth", key, 64))
        assert _code(e) == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as he:
            http.get_system_shared_memory_status()
        assert he.value.status() == "401"
        token = {"authorization": "Bearer s3cret"}
        client.register_system_shared_memory("auth", key, 64, headers=token)
        [status] = http.get_system_shared_memory_status(headers=token)
        assert status["name"] == "auth"
