"""Hardening of the gRPC ModelInfer path against hostile requests (issue 13, gRPC items).

One gateway subprocess (tiny model, a bearer token, a 64 MiB payload limit through
``--message-limit max-request-bytes``, as for models with unbounded inputs) serves the module;
big requests are serialised once and sent as bytes on a raw channel. Nothing here asserts a
duration: answers are checked by status and message, responsiveness by order (probes answer
before the big request does), memory by the gateway's VmRSS.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb

from server.errors import InvalidInput
from server.routing.options import RoutingOptions
from server.runtime.runner import GatewayProcess
from server.transports.grpc.contents import (
    PREFLIGHT_BYTES,
    TypedContents,
    check_sizes,
    wire_tensors,
)
from server.transports.options import LimitsOptions, ListenOptions, Ports

pytestmark = pytest.mark.integration

TOKEN = "s3cret"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
BIG_VALUES = 15_000_000  # 60 MB of FP32, under the 64 MiB default limit
RPC_TIMEOUT_S = 120.0  # a liveness bound, never a speed assertion


@pytest.fixture(scope="module")
def gw(tiny_repository: Path):
    # The tiny model's inputs are bounded, so by default gRPC itself would refuse a 60 MB
    # message (tests/server/test_request_bounds.py); these tests are about the checks a gateway
    # makes when its limit admits it (models with unbounded dynamic dims).
    args = ["--message-limit", "max-request-bytes"]
    with GatewayProcess(tiny_repository, args, env={"PRECISION_SERVE_AUTH_TOKEN": TOKEN}) as g:
        yield g


@pytest.fixture(scope="module")
def big_typed() -> bytes:
    """60 MB of ``fp32_contents`` declaring shape [1, 16] (16 values)."""
    req = pb.ModelInferRequest(model_name="tiny")
    t = req.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    # the packed field as protobuf encodes it (tag, length, values), parsed at C speed
    payload = np.zeros(BIG_VALUES, np.float32).tobytes()
    t.contents.MergeFromString(b"\x32" + _varint(len(payload)) + payload)
    assert len(t.contents.fp32_contents) == BIG_VALUES
    return req.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes([*out, n])


@pytest.fixture(scope="module")
def big_raw() -> bytes:
    """60 MB of ``raw_input_contents`` declaring shape [1, 16] (64 bytes)."""
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    req.raw_input_contents.append(bytes(4 * BIG_VALUES))
    return req.SerializeToString()


def _raw_call(gw: GatewayProcess):
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    channel = grpc.insecure_channel(gw.grpc_url, options=options)
    return channel, channel.unary_unary(
        MODEL_INFER, request_serializer=None, response_deserializer=None
    )


def _error(call, data: bytes, metadata=AUTH) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(data, metadata=metadata, timeout=RPC_TIMEOUT_S)
    return info.value


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def _largest_anonymous_rss_kib(pid: int) -> int:
    """The most any one anonymous mapping of ``pid`` holds resident (a 60 MB payload is one)."""
    largest, anonymous = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields[0]) > 8 and ":" not in fields[0]:
            anonymous = len(fields) < 6  # an address range with no path
        elif anonymous and fields[0] == "Rss:":
            largest = max(largest, int(fields[1]))
    return largest


def _rss_at_rest_kib(pid: int) -> int:
    """VmRSS once the gateway no longer holds a big request: a client has its reply before the
    server's call ends and drops the 60 MB payload (and gRPC's copy of it), so read at once the
    figure includes 0 to 2 payloads. Waits (a bound, not a duration asserted) until no anonymous
    mapping holds 32 MiB or more."""
    deadline = time.monotonic() + RPC_TIMEOUT_S
    while _largest_anonymous_rss_kib(pid) >= 32 * 1024 and time.monotonic() < deadline:
        time.sleep(0.02)
    return _rss_kib(pid)


def _valid_infer(client: grpcclient.InferenceServerClient) -> np.ndarray:
    x = np.ones((1, 16), np.float32)
    inp = grpcclient.InferInput("x", [1, 16], "FP32")
    inp.set_data_from_numpy(x)
    headers = dict(AUTH)
    return client.infer("tiny", [inp], headers=headers).as_numpy("logits")


def test_a_60mb_mismatched_typed_request_is_refused_by_name_while_others_are_served(gw, big_typed):
    channel, call = _raw_call(gw)
    done: dict[str, object] = {}
    order: list[str] = []

    def send_big() -> None:
        try:
            call(big_typed, metadata=AUTH, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as e:
            done["error"] = e
        order.append("big")

    client = grpcclient.InferenceServerClient(gw.grpc_url)
    try:
        sender = threading.Thread(target=send_big)
        sender.start()
        assert client.is_server_ready()
        assert _valid_infer(client).shape == (1, 4)
        order.append("probes")
        sender.join(RPC_TIMEOUT_S)
    finally:
        channel.close()
    assert order == ["probes", "big"]
    err = done["error"]
    assert isinstance(err, grpc.RpcError)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x'" in err.details()
    assert f"got {BIG_VALUES} values, expected 16" in err.details()


def test_mismatched_typed_contents_are_refused_before_any_conversion(monkeypatch):
    """The element count is checked on the repeated field's length: nothing is converted."""

    def no_conversion(self):
        raise AssertionError("typed contents were converted before the count was checked")

    monkeypatch.setattr(TypedContents, "to_numpy", no_conversion)
    req = pb.ModelInferRequest(model_name="tiny")
    t = req.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    t.contents.fp32_contents.extend([0.0] * 100_000)
    with pytest.raises(InvalidInput, match=r"input 'x': got 100000 values, expected 16"):
        wire_tensors(req)


def test_large_requests_are_size_checked_from_their_bytes_before_parsing(big_typed, big_raw):
    for data, needle in (
        (big_typed, f"input 'x': got {BIG_VALUES} values, expected 16 for shape [1, 16] of FP32"),
        (  # Triton's words, with the model and request id read off the bytes too
            big_raw,
            "[request id: <id_unknown>] input byte size mismatch for input 'x' for model "
            f"'tiny'. Expected 64, got {4 * BIG_VALUES} (for shape [1,16])",
        ),
    ):
        with pytest.raises(InvalidInput, match=re.escape(needle)):
            check_sizes(data)
    ok = pb.ModelInferRequest(model_name="tiny")
    ints = ok.inputs.add(name="ids", datatype="INT64", shape=[1000, 300])
    ints.contents.int64_contents.extend([-1, 2**40, 7] * 100_000)  # varints of 1 to 10 bytes
    check_sizes(ok.SerializeToString())
    ints.shape[0] = 999
    with pytest.raises(InvalidInput, match="got 300000 values, expected 299700"):
        check_sizes(ok.SerializeToString())
    check_sizes(b"\xff" * (2 * PREFLIGHT_BYTES))  # not a message: left to the parser


def test_typed_contents_convert_without_python_lists():
    req = pb.ModelInferRequest(model_name="m")
    values = np.arange(-3, 3, dtype=np.float32)
    f = req.inputs.add(name="f", datatype="FP32", shape=[2, 3])
    f.contents.fp32_contents.extend(values.tolist())
    d = req.inputs.add(name="d", datatype="FP64", shape=[6])
    d.contents.fp64_contents.extend(values.astype(np.float64).tolist())
    i = req.inputs.add(name="i", datatype="INT8", shape=[3])
    i.contents.int_contents.extend([-128, 0, 127])
    o = req.inputs.add(name="o", datatype="INT8", shape=[1])
    o.contents.int_contents.extend([300])
    f_t, d_t, i_t, o_t = wire_tensors(pb.ModelInferRequest.FromString(req.SerializeToString()))
    np.testing.assert_array_equal(np.asarray(f_t.values, np.float32), values)
    np.testing.assert_array_equal(np.asarray(d_t.values, np.float64), values)
    assert np.asarray(i_t.values, np.int8).tolist() == [-128, 0, 127]
    with pytest.raises(OverflowError, match="out of range"):
        np.asarray(o_t.values, np.int8)


@pytest.mark.slow  # 50 x 60 MB through loopback: about a minute on a busy 2-core host
def test_fifty_rejected_60mb_requests_leave_rss_within_200mb_of_baseline(gw, big_typed, big_raw):
    channel, call = _raw_call(gw)
    client = grpcclient.InferenceServerClient(gw.grpc_url)
    try:
        _valid_infer(client)
        # one of each first: the gateway's own buffers and allocator pools reach their size
        for data in (big_typed, big_raw):
            assert _error(call, data).code() == grpc.StatusCode.INVALID_ARGUMENT
        baseline = _rss_at_rest_kib(gw.pid)
        for i in range(50):
            data = big_typed if i % 2 else big_raw
            assert _error(call, data).code() == grpc.StatusCode.INVALID_ARGUMENT
        grown_mib = (_rss_at_rest_kib(gw.pid) - baseline) / 1024
        assert _valid_infer(client).shape == (1, 4)  # and it still serves
    finally:
        channel.close()
    assert grown_mib < 200, f"RSS grew {grown_mib:.0f} MiB over 50 rejected 60 MB requests"


def test_unauthenticated_requests_are_refused_before_the_payload_is_parsed(gw, big_typed):
    channel, call = _raw_call(gw)
    try:
        # garbage that would be INVALID_ARGUMENT ("malformed") if it were parsed first
        garbage = b"\xff" * (60 * 1024 * 1024)
        for data in (garbage, big_typed):
            err = _error(call, data, metadata=())
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            err = _error(call, data, metadata=(("authorization", "Bearer wrong"),))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        err = _error(call, garbage)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in err.details()
    finally:
        channel.close()


def test_non_utf8_binary_metadata_is_invalid_argument_naming_the_key(gw):
    channel, call = _raw_call(gw)
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="x", datatype="FP32", shape=[1, 16])
    req.raw_input_contents.append(np.ones((1, 16), np.float32).tobytes())
    data = req.SerializeToString()
    junk = ("x-junk-bin", b"\xff\xfe\x00")
    try:
        err = _error(call, data, metadata=(*AUTH, junk))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'x-junk-bin'" in err.details() and "UTF-8" in err.details()
        # without the token the answer is still UNAUTHENTICATED (authentication comes first)
        err = _error(call, data, metadata=(junk,))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert pb.ModelInferResponse.FromString(call(data, metadata=AUTH, timeout=30)).outputs
    finally:
        channel.close()


@pytest.mark.parametrize("shape", [[0, 2**62], [2**40, 0, 2**40]])
def test_a_zero_size_dim_beside_a_huge_one_is_invalid_argument(gw, shape):
    channel, call = _raw_call(gw)
    req = pb.ModelInferRequest(model_name="tiny")
    req.inputs.add(name="x", datatype="FP32", shape=shape)
    try:
        err = _error(call, req.SerializeToString())
    finally:
        channel.close()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'x'" in err.details() and str(shape) in err.details()
    assert "a dimension is too large" in err.details()


def test_grpc_max_concurrent_rpcs_option(tmp_path):
    from server.errors import ConfigError
    from server.runtime.options import parse

    args = parse(["--repository", str(tmp_path)]).limits
    assert args.grpc_max_concurrent_rpcs is None  # auto: from the gRPC message limit
    auto = parse(["--repository", "r", "--grpc-max-concurrent-rpcs", "auto"]).limits
    assert auto.grpc_max_concurrent_rpcs is None
    args = parse(["--repository", "r", "--grpc-max-concurrent-rpcs", "0"]).limits
    assert args.grpc_max_concurrent_rpcs == 0
    assert LimitsOptions(grpc_max_concurrent_rpcs=0).grpc_max_concurrent_rpcs == 0
    with pytest.raises(ConfigError, match="--grpc-max-concurrent-rpcs must be >= 0, got -1"):
        LimitsOptions(grpc_max_concurrent_rpcs=-1)


def test_pass_through_refuses_a_large_mismatched_request_before_parsing(tiny_repository):
    """With a forwarding (Triton) upstream a 60 MB typed-contents request declaring [1, 16] is
    refused by the pre-parse scan, naming the input, and never forwarded."""
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    from server.app import ServeOptions
    from server.catalog import load_repository
    from server.runtime.runner import InProcessGateway
    from server.upstreams.base import Capabilities, UpstreamSettings
    from server.upstreams.embedded.upstream import EmbeddedUpstream

    forwarded: list[int] = []

    class Forwarding(EmbeddedUpstream):
        capabilities = Capabilities(honours_deadline=True, forward=True)

        async def forward(self, variant, payload, deadline):
            forwarded.append(len(payload))
            raise AssertionError("a mismatched request must not be forwarded")

    repo = load_repository(tiny_repository)
    options = ServeOptions(
        RoutingOptions(tiny_repository),
        listen=ListenOptions(ports=Ports(0, 0, 0)),
        limits=LimitsOptions(message_limit="max-request-bytes"),
    )
    with InProcessGateway(options, upstream=Forwarding("", repo, UpstreamSettings())) as g:
        req = pb.ModelInferRequest(model_name="tiny_fp32")
        t = req.inputs.add(name="x", datatype="FP32", shape=[1, 16])
        t.contents.fp32_contents.extend(np.zeros(15_000_000, dtype=np.float32))
        with grpc.insecure_channel(
            g.grpc_url, options=[("grpc.max_send_message_length", 1 << 30)]
        ) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(req, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in info.value.details() and "15000000" in info.value.details()
    assert forwarded == []


def test_an_error_for_a_call_that_already_ended_is_not_a_traceback():
    """When the client's deadline passed while the engine ran inline (the soak met it), the
    status can no longer be sent: grpc.aio's abort raises ExecuteBatchError, which grpc logs as
    an ERROR with a traceback; the wrapper ends the handler as cancelled instead."""
    import asyncio
    from types import SimpleNamespace

    from server.errors import DeadlineExceeded
    from server.transports.grpc.service import _CALL_ENDED, _handled

    rejected: list[str] = []
    gateway = SimpleNamespace(restricted=frozenset(), count_rejected=lambda *a: rejected.append(a))
    servicer = SimpleNamespace(gateway=gateway)

    async def ModelInfer(self, request, context):
        raise DeadlineExceeded("deadline exceeded while the engine ran")

    class Ended:
        async def abort(self, code, details):
            raise _CALL_ENDED("Failed execute_batch")

    class Open:
        async def abort(self, code, details):
            raise grpc.aio.AbortError(code, details)

    wrapped = _handled(ModelInfer)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(wrapped(servicer, None, Ended()))
    with pytest.raises(grpc.aio.AbortError):  # a live call still gets its status
        asyncio.run(wrapped(servicer, None, Open()))
    assert len(rejected) == 2
