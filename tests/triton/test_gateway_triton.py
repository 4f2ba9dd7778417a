"""The gateway in front of real Triton replicas (``--upstream triton://...``): parity with the
embedded upstream, failover when a replica dies, precision fallback when a variant is unloaded,
and a replica address with nothing listening."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from common.model_repository import Manifest, load_manifests, samples_path
from common.process import wait_ready
from server.runtime.runner import GatewayProcess
from tests.helpers import free_port
from tests.triton.conftest import StartTriton
from tests.triton.load import Load, rows_served, successes

pytestmark = pytest.mark.integration


def _manifest(repo: Path) -> Manifest:
    (manifest,) = load_manifests(repo).values()
    return manifest


def _inputs(repo: Path, manifest: Manifest, rows: int) -> dict[str, np.ndarray]:
    """The builder's real sample rows (the repository's samples file; missing = a failure)."""
    samples = samples_path(repo, manifest.model)
    assert samples.is_file(), f"the builder wrote no samples file at {samples}"
    with np.load(samples) as data:
        missing = [t.name for t in manifest.inputs if t.name not in data.files]
        assert not missing, f"{samples.name} lacks inputs {missing} (has {data.files})"
        found = {t.name: data[t.name][:rows] for t in manifest.inputs}
    for t in manifest.inputs:
        assert found[t.name].shape[0] == rows, (t.name, found[t.name].shape, rows)
        assert found[t.name].dtype == np.dtype(t.dtype), (t.name, found[t.name].dtype, t.dtype)
    return found


def _infer(
    client: grpcclient.InferenceServerClient,
    model: str,
    inputs: dict[str, np.ndarray],
    precision: str | None = None,
) -> tuple[dict[str, np.ndarray], str]:
    tensors = []
    for name, array in inputs.items():
        t = grpcclient.InferInput(
            name, list(array.shape), grpcclient.np_to_triton_dtype(array.dtype)
        )
        t.set_data_from_numpy(array)
        tensors.append(t)
    params = {"precision": precision} if precision else None
    result = client.infer(model, tensors, parameters=params, client_timeout=30)
    response = result.get_response()
    outputs = {o.name: result.as_numpy(o.name) for o in response.outputs}
    return outputs, response.parameters["precision"].string_param


def _metric(url: str, name: str, labels: dict[str, str]) -> float | None:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def _upstream(*addresses: str) -> list[str]:
    return ["--upstream", "triton://" + ",".join(addresses)]


# ---- parity -----------------------------------------------------------------------------------
def test_parity_every_digits_variant_through_triton_equals_embedded(
    digits_repository: Path, start_triton: StartTriton
) -> None:
    manifest = _manifest(digits_repository)
    inputs = _inputs(digits_repository, manifest, rows=16)
    triton = start_triton(digits_repository)
    with (
        GatewayProcess(digits_repository, extra_args=_upstream(triton.grpc_url)) as via_triton,
        GatewayProcess(
            digits_repository, extra_args=["--upstream", "embedded?threads=1"]
        ) as embedded,
    ):
        a = grpcclient.InferenceServerClient(via_triton.grpc_url)
        b = grpcclient.InferenceServerClient(embedded.grpc_url)
        for precision, record in manifest.variants.items():
            got, served = _infer(a, record.triton_name, inputs)
            want, _ = _infer(b, record.triton_name, inputs)
            assert served == precision
            assert got.keys() == want.keys() == {t.name for t in manifest.outputs}
            for name in want:
                assert got[name].dtype == want[name].dtype
                np.testing.assert_array_equal(got[name], want[name], err_msg=record.triton_name)
        # Triton really served them: its own statistics count the requests.
        stats = grpcclient.InferenceServerClient(triton.grpc_url).get_inference_statistics()
        served_by_triton = {s.name: s.inference_stats.success.count for s in stats.model_stats}
        for record in manifest.variants.values():
            assert served_by_triton[record.triton_name] >= 1
        a.close()
        b.close()


# ---- failover ---------------------------------------------------------------------------------
def test_failover_when_a_replica_is_killed_under_load(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    variant = _manifest(tiny_repository).variants["fp32"].triton_name
    a = start_triton(tiny_repository)
    b = start_triton(tiny_repository)
    x = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)
    with GatewayProcess(tiny_repository, extra_args=_upstream(a.grpc_url, b.grpc_url)) as gw:
        with Load(gw.grpc_url, variant, {"x": x}) as load:
            wait_ready(lambda: len(load.calls) >= 150, 30, "steady load before the kill")
            served_a_before = rows_served(a.grpc_url, variant)
            assert successes(b.grpc_url, variant) > 0 and served_a_before > 0  # both balanced
            killed_at = time.monotonic()
            b.kill()
            wait_ready(
                lambda: sum(1 for s, _, _ in load.calls if s > killed_at) >= 150,
                30,
                "traffic after the kill",
            )
        calls = list(load.calls)
        failed = [c for c in calls if c[2] is not None]
        # Only requests in flight on the killed replica at that instant may fail (the gateway
        # retries UNAVAILABLE once on the survivor, so usually none do).
        assert all(start <= killed_at <= end for start, end, _ in failed), failed
        assert len(failed) <= 3
        after = [c for c in calls if c[0] > killed_at]
        print(f"failover: {len(calls)} calls, {len(failed)} failed, {len(after)} after the kill")
        assert len(after) >= 150 and all(c[2] is None for c in after)
        # rows: each request carries one or more
        assert rows_served(a.grpc_url, variant) - served_a_before >= len(after)
        labels = {"upstream": f"triton://{b.grpc_url}", "model": variant}
        # the requests went through Envoy (which took b out): the control plane behind it learns
        # of b from its own readiness check, on its interval
        wait_ready(
            lambda: _metric(gw.metrics_url, "precision_serve_upstream_ready", labels) == 0.0,
            15,
            "the control plane sees the killed replica unready",
        )
        labels["upstream"] = f"triton://{a.grpc_url}"
        assert _metric(gw.metrics_url, "precision_serve_upstream_ready", labels) == 1.0


# ---- fallback ---------------------------------------------------------------------------------
def test_unloaded_int8_falls_back_to_the_next_precision_and_says_so(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    manifest = _manifest(tiny_repository)
    int8 = manifest.variants["int8"].triton_name
    triton = start_triton(tiny_repository, model_control="explicit")
    x = {"x": np.random.default_rng(1).normal(size=(2, 16)).astype(np.float32)}
    # the Python front's fallback and its metric (through Envoy: tests/triton/test_envoy_front.py)
    args = ["--upstream", f"triton://{triton.grpc_url}?front=python"]
    with GatewayProcess(tiny_repository, extra_args=args) as gw:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        control = grpcclient.InferenceServerClient(triton.grpc_url)
        out_int8, served = _infer(client, manifest.model, x, precision="int8")
        assert served == "int8"

        control.unload_model(int8)  # Triton's model-control API
        wait_ready(lambda: not client.is_model_ready(int8), 15, f"gateway sees {int8} unready")
        out, served = _infer(client, manifest.model, x, precision="int8")
        assert served == "fp16"  # default chain int8 -> fp16 -> fp32
        fp16, _ = _infer(client, manifest.variants["fp16"].triton_name, x)
        np.testing.assert_array_equal(out["logits"], fp16["logits"])
        assert out["logits"].dtype == out_int8["logits"].dtype  # same interface either way
        fallbacks = _metric(
            gw.metrics_url,
            "precision_serve_fallbacks_total",
            {"model": manifest.model, "from_precision": "int8", "to_precision": "fp16"},
        )
        assert fallbacks is not None and fallbacks >= 1

        control.load_model(int8)
        wait_ready(lambda: client.is_model_ready(int8), 30, f"gateway sees {int8} ready again")
        assert _infer(client, manifest.model, x, precision="int8")[1] == "int8"
        client.close()
        control.close()


# ---- bad upstream -----------------------------------------------------------------------------
def test_a_replica_with_nothing_listening_does_not_stop_the_gateway(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    manifest = _manifest(tiny_repository)
    triton = start_triton(tiny_repository)
    dead = f"127.0.0.1:{free_port()}"
    x = {"x": np.zeros((1, 16), np.float32)}
    with GatewayProcess(
        tiny_repository, extra_args=[*_upstream(dead, triton.grpc_url), "--log-level", "INFO"]
    ) as gw:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        assert client.is_server_ready()
        for _ in range(10):  # every request is served, none lands on the dead address
            for record in manifest.variants.values():
                assert _infer(client, record.triton_name, x)[1] == record.precision
        client.close()
        for record in manifest.variants.values():
            for address, ready in ((dead, 0.0), (triton.grpc_url, 1.0)):
                labels = {"upstream": f"triton://{address}", "model": record.triton_name}
                assert _metric(gw.metrics_url, "precision_serve_upstream_ready", labels) == ready
        log = gw.log()
    assert f"triton replica {dead} is unready" in log
