"""Each routing policy and the fallback chain, end to end through tritonclient."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from prometheus_client import REGISTRY
from tritonclient.utils import InferenceServerException

from common.process import wait_ready
from server.app import ServeOptions
from server.catalog import load_repository
from server.routing.options import RoutingOptions
from server.runtime.runner import GatewayProcess, InProcessGateway
from server.transports.options import ListenOptions, Ports
from server.upstreams.base import UpstreamSettings, UpstreamUnavailable
from server.upstreams.embedded.upstream import EmbeddedUpstream
from tests.server.conftest import ort_outputs, rows

pytestmark = pytest.mark.integration


def routing_file(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def infer(url: str, model: str = "tiny", x: np.ndarray | None = None, **kw):
    client = grpcclient.InferenceServerClient(url)
    x = rows(1) if x is None else x
    inp = grpcclient.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], **kw)
    return result.get_response().parameters["precision"].string_param, result.as_numpy("logits")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def sample_value(text: str, prefix: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_split_policy_weighted_and_sticky(tiny_repository, tmp_path):
    doc = {"seed": 3, "models": {"tiny": {"policy": "split", "weights": {"fp32": 50, "int8": 50}}}}
    with GatewayProcess(tiny_repository, ["--routing", str(routing_file(tmp_path, doc))]) as gw:
        seen = Counter(infer(gw.grpc_url)[0] for _ in range(40))
        assert set(seen) == {"fp32", "int8"}
        for key in ("user-1", "user-2", "user-3"):
            sticky = {infer(gw.grpc_url, headers={"x-request-key": key})[0] for _ in range(8)}
            assert len(sticky) == 1
        via_param = {infer(gw.grpc_url, parameters={"x-request-key": "k9"})[0] for _ in range(8)}
        assert len(via_param) == 1
        text = scrape(gw.metrics_url)
    for p in ("fp32", "int8"):
        labels = f'model="tiny",policy="split",precision="{p}"'
        series = f"precision_serve_routing_decisions_total{{{labels}}}"
        assert sample_value(text, series) > 0


def test_auto_policy_serves_fastest_variant_within_budget(routing_repo, tmp_path):
    doc = {"models": {"tiny": {"policy": "auto", "accuracy_budget": 1.0}}}
    with GatewayProcess(routing_repo, ["--routing", str(routing_file(tmp_path, doc))]) as gw:
        x = rows(2, seed=4)
        precision, out = infer(gw.grpc_url, x=x)
        assert precision == "int8"
        np.testing.assert_allclose(out, ort_outputs(routing_repo, "int8", x), rtol=1e-5, atol=1e-6)
        # the logical model's config is the auto-chosen variant's, under the logical name
        cfg = grpcclient.InferenceServerClient(gw.grpc_url).get_model_config("tiny").config
        assert cfg.name == "tiny"


def test_shadow_policy_serves_one_and_records_agreement(tiny_repository, tmp_path):
    doc = {
        "models": {
            "tiny": {
                "policy": "shadow",
                "precision": "int8",
                "shadow": {"reference": "fp32", "fraction": 1.0},
            }
        }
    }
    with GatewayProcess(tiny_repository, ["--routing", str(routing_file(tmp_path, doc))]) as gw:
        x = rows(4, seed=5)
        for _ in range(10):
            precision, out = infer(gw.grpc_url, x=x)
            assert precision == "int8"  # the served answer is the int8 one, never the reference
            np.testing.assert_allclose(
                out, ort_outputs(tiny_repository, "int8", x), rtol=1e-5, atol=1e-6
            )
        labels = 'model="tiny",precision="int8",reference="fp32"'

        def compared() -> bool:
            return (
                sample_value(
                    scrape(gw.metrics_url), f"precision_serve_shadow_cosine_count{{{labels}}}"
                )
                >= 40
            )

        wait_ready(compared, 10, "shadow comparisons")
        text = scrape(gw.metrics_url)
    agree = sample_value(
        text, f'precision_serve_shadow_comparisons_total{{{labels},top1_agree="true"}}'
    )
    disagree = sample_value(
        text, f'precision_serve_shadow_comparisons_total{{{labels},top1_agree="false"}}'
    )
    assert agree + disagree >= 40  # 4 rows per request
    served = np.argmax(ort_outputs(tiny_repository, "int8", x), axis=1)
    reference = np.argmax(ort_outputs(tiny_repository, "fp32", x), axis=1)
    assert agree == 10 * int(np.sum(served == reference))
    assert sample_value(text, f'precision_serve_shadow_cosine_bucket{{{labels},le="0.9"}}') == 0


def test_fallback_when_a_variant_fails_to_load(repo_copy):
    (repo_copy / "tiny_int8" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    with GatewayProcess(repo_copy) as gw:
        g = grpcclient.InferenceServerClient(gw.grpc_url)
        assert not g.is_model_ready("tiny_int8")
        assert g.is_model_ready("tiny") and g.is_server_ready()
        index = {m.name: m for m in g.get_model_repository_index().models}
        assert (
            index["tiny_int8"].state == "UNAVAILABLE" and "onnxruntime" in index["tiny_int8"].reason
        )
        x = rows(2, seed=6)
        precision, out = infer(gw.grpc_url, x=x, parameters={"precision": "int8"})
        assert precision == "fp16"  # int8 -> fp16 -> fp32
        np.testing.assert_allclose(out, ort_outputs(repo_copy, "fp16", x), rtol=1e-5, atol=1e-6)
        h = httpclient.InferenceServerClient(gw.http_url)
        inp = httpclient.InferInput("x", [2, 16], "FP32")
        inp.set_data_from_numpy(x)
        resp = h.infer("tiny", [inp], headers={"x-precision": "int8"}).get_response()
        assert resp["parameters"]["precision"] == "fp16" and resp["model_name"] == "tiny_fp16"
        # a variant asked for by name has no fallback
        with pytest.raises(InferenceServerException) as info:
            infer(gw.grpc_url, model="tiny_int8")
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        text = scrape(gw.metrics_url)
    series = (
        'precision_serve_fallbacks_total{from_precision="int8",model="tiny",to_precision="fp16"}'
    )
    assert sample_value(text, series) == 2
    assert 'precision_serve_upstream_ready{model="tiny_int8",upstream="embedded"} 0.0' in text


def test_fallback_skips_every_broken_variant(repo_copy):
    (repo_copy / "tiny_int8" / "1" / "model.onnx").unlink()
    (repo_copy / "tiny_fp16" / "config.pbtxt").write_text("this is { not a config")
    with GatewayProcess(repo_copy) as gw:
        assert infer(gw.grpc_url, headers={"x-precision": "int8"})[0] == "fp32"
        assert infer(gw.grpc_url, parameters={"precision": "fp16"})[0] == "fp32"


class FlakyUpstream(EmbeddedUpstream):
    """Test double: the real embedded upstream, except that chosen variants answer UNAVAILABLE
    (like a Triton replica that is going away) or are slow."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.unavailable: set[str] = set()
        self.slow: dict[str, float] = {}

    async def infer(self, variant, inputs, deadline):
        if variant.name in self.unavailable:
            raise UpstreamUnavailable(f"{variant.name}: upstream answered UNAVAILABLE")
        if variant.name in self.slow:
            await asyncio.sleep(self.slow[variant.name])
        return await super().infer(variant, inputs, deadline)


@pytest.fixture
def in_process(tiny_repository):
    repo = load_repository(tiny_repository)
    upstream = FlakyUpstream("", repo, UpstreamSettings())
    upstream.unavailable, upstream.slow = {"tiny_int8"}, {"tiny_fp16": 1.0}
    options = ServeOptions(
        RoutingOptions(tiny_repository), listen=ListenOptions(ports=Ports(0, 0, 0))
    )
    with InProcessGateway(options, upstream=upstream) as gw:
        yield gw


def test_fallback_when_upstream_answers_unavailable(in_process, tiny_repository):
    x = rows(3, seed=8)
    precision, out = infer(in_process.grpc_url, x=x, parameters={"precision": "int8"})
    assert precision == "fp16"
    np.testing.assert_allclose(out, ort_outputs(tiny_repository, "fp16", x), rtol=1e-5, atol=1e-6)


def test_client_deadline_is_honoured(in_process):
    labels = {"model": "tiny", "precision": "fp16", "protocol": "grpc"}
    labels["status"] = "DEADLINE_EXCEEDED"

    def expired() -> float:  # the in-process gateway shares this process's registry
        return REGISTRY.get_sample_value("precision_serve_requests_total", labels) or 0.0

    before = expired()
    with pytest.raises(InferenceServerException) as info:
        infer(in_process.grpc_url, parameters={"precision": "fp16"}, client_timeout=0.3)
    assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"

    wait_ready(lambda: expired() == before + 1, 5, "the server to give up on the expired request")
    # the server keeps serving
    assert infer(in_process.grpc_url)[0] == "fp32"


def test_repository_index_over_http_lists_logical_and_variants(in_process):
    body = json.dumps({"ready": True}).encode()
    req = urllib.request.Request(f"http://{in_process.http_url}/v2/repository/index", data=body)
    with urllib.request.urlopen(req, timeout=10) as resp:
        names = {m["name"] for m in json.loads(resp.read())}
    assert names == {"tiny", "tiny_fp32", "tiny_fp16", "tiny_int8"}
