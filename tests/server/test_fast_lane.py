"""The plain request's short way into the core (server/transports/grpc/fast_lane.py): it accepts
only what it proves valid, is answered and recorded by the core's one inference path as any other
request, and leaves every error to the core's checks."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2 as pb
from tritonclient.utils import InferenceServerException

from server.app import ServeOptions
from server.catalog import load_repository
from server.routing.options import RoutingOptions
from server.runtime.runner import InProcessGateway
from server.transports.grpc import fast_lane
from server.transports.options import ListenOptions, Ports
from tests.server.conftest import ort_outputs, rows


def _request(x: np.ndarray, model: str = "tiny_fp32", name: str = "x", dtype: str = "FP32"):
    r = pb.ModelInferRequest(model_name=model)
    t = r.inputs.add(name=name, datatype=dtype)
    t.shape.extend(x.shape)
    r.raw_input_contents.append(x.tobytes())
    return r


@pytest.fixture
def lane(tiny_repository):
    gateway = SimpleNamespace(
        repository=load_repository(tiny_repository), max_request_bytes=64 * 1024 * 1024
    )
    return fast_lane.FastLane(gateway)


def test_a_plain_request_is_decoded_for_its_variant(lane):
    x = rows(3)
    arrays = lane.arrays(_request(x))
    assert arrays is not None
    assert list(arrays) == ["x"]
    np.testing.assert_array_equal(arrays["x"], x)
    assert arrays["x"].flags.writeable  # engines get their own copy, as decode() gives


def _with(change):
    r = _request(rows(2))
    change(r)
    return r


@pytest.mark.parametrize(
    "why, request_",
    [
        ("logical model: routed", _request(rows(2), model="tiny")),
        ("unknown name", _request(rows(2), model="nope_fp32")),
        ("wrong datatype", _request(rows(2).astype(np.float64), dtype="FP64")),
        ("wrong input name", _request(rows(2), name="y")),
        ("wrong dims", _request(np.zeros((2, 15), np.float32))),
        ("rank", _request(np.zeros((2, 16, 1), np.float32))),
        ("batch over max_batch_size", _request(np.zeros((10_000, 16), np.float32))),
        ("byte count", _with(lambda r: r.raw_input_contents.__setitem__(0, b"\0" * 12))),
        (
            "a parameter",
            _with(lambda r: r.parameters["precision"].__setattr__("string_param", "int8")),
        ),
        ("requested outputs", _with(lambda r: r.outputs.add(name="logits"))),
        (
            "shared memory input",
            _with(
                lambda r: (
                    r.inputs[0].parameters["shared_memory_region"].__setattr__("string_param", "r")
                )
            ),
        ),
        ("version 2", _with(lambda r: r.__setattr__("model_version", "2"))),
        ("typed contents", _with(lambda r: r.ClearField("raw_input_contents"))),
        (
            "input twice",
            _with(
                lambda r: (
                    r.inputs.append(r.inputs[0]),
                    r.raw_input_contents.append(r.raw_input_contents[0]),
                )
            ),
        ),
    ],
)
def test_anything_not_proven_valid_takes_the_general_path(lane, why, request_):
    assert lane.arrays(request_) is None, why


def test_over_the_request_limit_takes_the_general_path(lane):
    lane._gateway.max_request_bytes = 100
    assert lane.arrays(_request(rows(2))) is None  # 128 bytes


def _count(g: InProcessGateway, status: str) -> float:
    from prometheus_client import REGISTRY

    labels = {"model": "tiny", "precision": "fp32", "protocol": "grpc", "status": status}
    return REGISTRY.get_sample_value("precision_serve_requests_total", labels) or 0.0


def _watch_the_lane(monkeypatch) -> list:
    """What FastLane.arrays returned, call by call (None: the general path)."""
    seen: list = []
    original = fast_lane.FastLane.arrays
    monkeypatch.setattr(
        fast_lane.FastLane, "arrays", lambda self, r: seen.append(x := original(self, r)) or x
    )
    return seen


def test_the_short_way_answers_and_records_like_the_general_path(tiny_repository, monkeypatch):
    seen = _watch_the_lane(monkeypatch)
    options = ServeOptions(
        RoutingOptions(tiny_repository), listen=ListenOptions(ports=Ports(0, 0, 0))
    )
    with InProcessGateway(options) as g:
        client = grpcclient.InferenceServerClient(g.grpc_url)
        x = rows(3, seed=5)
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        ok_before = _count(g, "ok")
        plain = client.infer("tiny_fp32", [inp])
        assert seen[-1] is not None  # it took the short way
        seen.clear()
        timed = client.infer("tiny_fp32", [inp], client_timeout=30)
        assert seen and seen[-1] is not None  # with a deadline too (most clients send one)
        np.testing.assert_array_equal(timed.as_numpy("logits"), plain.as_numpy("logits"))
        out = grpcclient.InferRequestedOutput("logits")
        general = client.infer("tiny_fp32", [inp], outputs=[out])
        assert seen[-1] is None  # requested outputs: the general path
        np.testing.assert_allclose(
            plain.as_numpy("logits"), ort_outputs(tiny_repository, "fp32", x), rtol=1e-5
        )
        np.testing.assert_array_equal(plain.as_numpy("logits"), general.as_numpy("logits"))
        a, b = plain.get_response(), general.get_response()
        assert (
            (a.model_name, a.model_version) == (b.model_name, b.model_version) == ("tiny_fp32", "1")
        )
        assert a.parameters["precision"].string_param == "fp32"
        assert _count(g, "ok") == ok_before + 3
        stats = client.get_inference_statistics("tiny_fp32").model_stats[0]
        assert stats.inference_stats.success.count == 3
        assert stats.inference_count == 9  # rows, both ways

        # a bad request is never the lane's: the general path's error, counted
        bad = grpcclient.InferInput("x", [3, 15], "FP32")
        bad.set_data_from_numpy(np.zeros((3, 15), np.float32))
        with pytest.raises(InferenceServerException) as e:
            client.infer("tiny_fp32", [bad])
        assert e.value.status() == str(grpc.StatusCode.INVALID_ARGUMENT)
        assert e.value.message().startswith(
            "[request id: <id_unknown>] unexpected shape for input 'x' for model 'tiny_fp32'. "
            "Expected [-1,16], got [3,15]."
        )
        assert _count(g, "INVALID_ARGUMENT") >= 1
        client.close()


def test_the_short_way_ends_a_request_at_its_deadline(repo_copy, monkeypatch):
    """A request waiting in the batcher's queue (preferred batch 8, an hour's queue delay: one
    request waits forever) past its client's deadline ends there: the gateway counts it
    DEADLINE_EXCEEDED, as the general path would, instead of holding it until the client gives
    up (CANCELLED)."""
    import time

    from common.model_repository import read_config, write_config

    seen = _watch_the_lane(monkeypatch)
    cfg = read_config(repo_copy / "tiny_fp32")
    cfg.dynamic_batching.max_queue_delay_microseconds = 3_600_000_000
    del cfg.dynamic_batching.preferred_batch_size[:]
    cfg.dynamic_batching.preferred_batch_size.append(8)
    write_config(repo_copy / "tiny_fp32", cfg)
    options = ServeOptions(RoutingOptions(repo_copy), listen=ListenOptions(ports=Ports(0, 0, 0)))
    with InProcessGateway(options) as g:
        client = grpcclient.InferenceServerClient(g.grpc_url)
        inp = grpcclient.InferInput("x", [1, 16], "FP32")
        inp.set_data_from_numpy(rows(1, seed=3))
        before = _count(g, "DEADLINE_EXCEEDED")
        with pytest.raises(InferenceServerException) as e:
            client.infer("tiny_fp32", [inp], client_timeout=0.3)
        assert e.value.status() == str(grpc.StatusCode.DEADLINE_EXCEEDED)
        assert seen and seen[-1] is not None  # it was the short way's
        end = time.monotonic() + 5
        while _count(g, "DEADLINE_EXCEEDED") == before and time.monotonic() < end:
            time.sleep(0.02)
        assert _count(g, "DEADLINE_EXCEEDED") == before + 1
        assert _count(g, "CANCELLED") == 0
        client.close()
