"""Envoy in front of a real Triton (``--upstream triton://...?front=envoy``): inference goes
client -> Envoy -> Triton, everything else to the gateway behind it (the control plane).

Where a request went is read from Envoy's own counters (clusters named after the variants, and
``control_grpc`` for the gateway) and from Triton's statistics."""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml
from tritonclient.utils import InferenceServerException

from common.process import wait_ready
from server.front.config import split_runtime
from server.runtime.runner import GatewayProcess
from server.upstreams.triton.detach import crashes_on_cancel
from tests.triton.conftest import StartTriton

pytestmark = pytest.mark.integration
X = np.random.default_rng(7).normal(size=(2, 16)).astype(np.float32)


def _stats(gw: GatewayProcess, what: str = "upstream_rq_total") -> dict[str, int]:
    """cluster name -> Envoy's counter ``what`` for it."""
    url = f"http://127.0.0.1:{gw.ports['envoy_admin_port']}/stats?format=json&filter={what}$"
    stats = json.loads(urllib.request.urlopen(url, timeout=5).read())["stats"]
    return {
        s["name"].split(".")[1]: int(s["value"])
        for s in stats
        if s["name"].startswith("cluster.") and "value" in s
    }


def _metric(gw: GatewayProcess, model: str, precision: str) -> float | None:
    """precision_serve_envoy_upstream_requests_total{model, precision, protocol="grpc"}."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(gw.metrics_url, timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "precision_serve_envoy_upstream_requests_total" and sample.labels == {
                "model": model,
                "precision": precision,
                "protocol": "grpc",
            }:
                return sample.value
    return None


def _runtime(gw: GatewayProcess, values: dict[str, int]) -> None:
    query = "&".join(f"{k}={v}" for k, v in values.items())
    url = f"http://127.0.0.1:{gw.ports['envoy_admin_port']}/runtime_modify?{query}"
    urllib.request.urlopen(urllib.request.Request(url, method="POST", data=b""), timeout=5)


def _infer(
    client: grpcclient.InferenceServerClient,
    model: str,
    precision: str | None = None,
    headers: dict[str, str] | None = None,
    version: str = "",
) -> tuple[str, str, np.ndarray]:
    t = grpcclient.InferInput("x", list(X.shape), "FP32")
    t.set_data_from_numpy(X)
    params = {"precision": precision} if precision else None
    result = client.infer(
        model, [t], version, parameters=params, headers=headers, client_timeout=30
    )
    p = result.get_response().parameters
    return p["precision"].string_param, p["fallback_from"].string_param, result.as_numpy("logits")


def _http_infer(
    url: str,
    model: str,
    headers: dict[str, str] | None = None,
    binary: bool = True,
    version: str = "",
) -> tuple[str, np.ndarray]:
    """(the x-precision response header, the logits) of an HTTP inference: the body is
    tritonclient's own (binary tensors or JSON), sent with urllib to see the reply's headers."""
    t = httpclient.InferInput("x", list(X.shape), "FP32")
    t.set_data_from_numpy(X, binary_data=binary)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([t])
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}{f'/versions/{version}' if version else ''}/infer",
        data=body,
        method="POST",
    )
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    if json_size is not None:
        request.add_header("Inference-Header-Content-Length", str(json_size))
    with urllib.request.urlopen(request, timeout=30) as reply:
        length = reply.headers.get("Inference-Header-Content-Length")
        result = httpclient.InferenceServerClient.parse_response_body(
            reply.read(), header_length=int(length) if length else None
        )
        return reply.headers.get("x-precision", ""), result.as_numpy("logits")


def _routing(tmp_path: Path, routing: dict) -> list[str]:
    path = tmp_path / "routing.yaml"
    path.write_text(yaml.safe_dump(routing))
    return ["--routing", str(path)]


def test_every_way_of_asking_for_a_precision_is_routed_in_envoy(
    tiny_repository: Path, start_triton: StartTriton, tmp_path: Path
) -> None:
    triton = start_triton(tiny_repository, model_control="explicit")
    split = {"models": {"tiny": {"policy": "split", "weights": {"int8": 70, "fp16": 30}}}}
    # HTTP inference too
    upstream = f"triton://{triton.grpc_url}?http={triton.http_port}&front=envoy"
    args = ["--upstream", upstream, *_routing(tmp_path, split)]
    direct = grpcclient.InferenceServerClient(triton.grpc_url)
    with GatewayProcess(tiny_repository, extra_args=args) as gw:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        before = _stats(gw)
        # a variant by name, the x-precision header, the precision parameter
        assert _infer(client, "tiny_int8")[:2] == ("int8", "")
        assert _infer(client, "tiny", headers={"x-precision": "fp32"})[:2] == ("fp32", "")
        precision, _, out = _infer(client, "tiny", precision="fp16")
        assert precision == "fp16"
        want = direct.infer("tiny_fp16", [_input()]).as_numpy("logits")
        np.testing.assert_array_equal(out, want)  # Triton's own answer, bytes unchanged
        # with the one version, "1" (perf_analyzer's -x 1), all the same
        assert _infer(client, "tiny_int8", version="1")[:2] == ("int8", "")
        assert _infer(client, "tiny", precision="fp16", version="1")[:2] == ("fp16", "")
        after = _stats(gw)
        assert {v: after[v] - before[v] for v in ("tiny_int8", "tiny_fp32", "tiny_fp16")} == {
            "tiny_int8": 2,
            "tiny_fp32": 1,
            "tiny_fp16": 2,
        }
        assert after["control_grpc"] == before["control_grpc"]  # Python saw none of them
        # ... and the gateway's /metrics shows Envoy's counts under the project's names
        assert _metric(gw, "tiny", "int8") == after["tiny_int8"] >= 1

        # the policy: 70/30 split in Envoy (runtime fractions)
        served = [_infer(client, "tiny")[0] for _ in range(300)]
        share = served.count("int8") / len(served)
        assert set(served) == {"int8", "fp16"} and 0.6 <= share <= 0.8, share
        # the control plane moves the weights at run time (/runtime_modify): all fp16
        _runtime(gw, split_runtime("tiny", {"int8": 0, "fp16": 1}))
        assert {_infer(client, "tiny")[0] for _ in range(40)} == {"fp16"}

        # fallback across an unloaded variant: Triton answers NOT_FOUND, the next attempt goes
        # to the next precision's cluster (with its own model_name), and the reply says so
        direct.unload_model("tiny_int8")
        wait_ready(lambda: not direct.is_model_ready("tiny_int8"), 15, "tiny_int8 unloaded")
        routed = {"model": "tiny", "precision": "int8", "protocol": "grpc", "policy": "request"}
        asked = _series(gw, "precision_serve_envoy_routed_requests_total", **routed)
        precision, fallback_from, out = _infer(client, "tiny", precision="int8")
        assert (precision, fallback_from) == ("fp16", "int8")
        np.testing.assert_array_equal(out, want)
        # one request routed to int8 by the client's ask, however many attempts it took
        assert _series(gw, "precision_serve_envoy_routed_requests_total", **routed) == asked + 1
        http = httpclient.InferenceServerClient(gw.http_url)
        served, answer = _http_infer(
            gw.http_url, "tiny", {"x-precision": "int8"}
        )  # HTTP: 404 -> next
        assert served == "fp16"
        np.testing.assert_array_equal(answer, want)
        direct.load_model("tiny_int8")
        assert _infer(client, "tiny", precision="int8")[:2] == ("int8", "")

        # what Envoy does not route reaches the control plane: metadata, unknown names
        control = _stats(gw)["control_grpc"]
        assert client.get_model_metadata("tiny").name == "tiny"
        with pytest.raises(InferenceServerException) as unknown:
            _infer(client, "nope")
        assert unknown.value.status() == "StatusCode.NOT_FOUND"
        assert "(see the repository index)" in unknown.value.message()  # the gateway's words
        with pytest.raises(InferenceServerException) as bad:
            _infer(client, "tiny", precision="fp8")
        assert bad.value.status() == "StatusCode.NOT_FOUND" and "fp8" in bad.value.message()
        with pytest.raises(InferenceServerException) as version:
            _infer(client, "tiny_int8", version="2")
        assert version.value.status() == "StatusCode.NOT_FOUND"
        assert "'tiny_int8' version 2 is not found" in version.value.message()
        assert _stats(gw)["control_grpc"] - control == 4

        # HTTP inference in Envoy too (binary tensors and JSON), the rest to the control plane
        before = _stats(gw)
        served, answer = _http_infer(gw.http_url, "tiny", {"x-precision": "fp16"})
        assert served == "fp16"
        np.testing.assert_array_equal(answer, want)
        assert _http_infer(gw.http_url, "tiny_int8", binary=False)[0] == "int8"
        assert _http_infer(gw.http_url, "tiny_int8", version="1")[0] == "int8"
        # the split: all fp16 as set above, or 70/30 again if the readiness follower saw int8
        # unloaded and loaded (it restores the routing file's split then)
        by_split = _http_infer(gw.http_url, "tiny")[0]
        assert by_split in ("int8", "fp16")
        after = _stats(gw)
        fp16, int8 = (after[f"tiny_{p}_http"] - before[f"tiny_{p}_http"] for p in ("fp16", "int8"))
        want = 2 if by_split == "fp16" else 1
        assert fp16 == want and int8 >= 4 - want, (fp16, int8)
        assert after["control_http"] == before["control_http"]
        assert http.is_server_ready() and http.get_model_metadata("tiny")["name"] == "tiny"
        assert _stats(gw)["control_http"] - after["control_http"] == 2
        client.close()
    direct.close()


def _input() -> grpcclient.InferInput:
    t = grpcclient.InferInput("x", list(X.shape), "FP32")
    t.set_data_from_numpy(X)
    return t


def _series(gw: GatewayProcess, name: str, **labels: str) -> float:
    """The sum of the gateway's ``name`` samples whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(gw.metrics_url, timeout=5).read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def _successes(c: grpcclient.InferenceServerClient, name: str) -> int:
    (entry,) = c.get_inference_statistics(name).model_stats
    return entry.inference_stats.success.count


SHADOW = {
    "models": {"tiny": {"policy": "shadow", "precision": "int8", "shadow": {"fraction": 1.0}}}
}
COMPARED = {"model": "tiny", "precision": "int8", "reference": "fp32"}


def test_shadow_agreement_is_sampled_by_the_control_plane(
    tiny_repository: Path, start_triton: StartTriton, tmp_path: Path
) -> None:
    """Envoy mirrors the sampled fraction to the control plane, which runs it on the served
    precision and on the reference in Triton and records the agreement; clients get the served
    precision's answer from Triton through Envoy, and nothing counts twice."""
    triton = start_triton(tiny_repository)
    upstream = f"triton://{triton.grpc_url}?http={triton.http_port}&front=envoy"  # HTTP too
    direct = grpcclient.InferenceServerClient(triton.grpc_url)
    served = direct.infer("tiny_int8", [_input()]).as_numpy("logits")
    reference = direct.infer("tiny_fp32", [_input()]).as_numpy("logits")
    agreeing_rows = int(np.sum(np.argmax(served, 1) == np.argmax(reference, 1)))
    n = 20
    with GatewayProcess(
        tiny_repository, ["--upstream", upstream, *_routing(tmp_path, SHADOW)]
    ) as gw:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        before = _stats(gw)
        runs = {v: _successes(direct, v) for v in ("tiny_int8", "tiny_fp32")}
        for _ in range(n):
            precision, fallback_from, out = _infer(client, "tiny")
            assert (precision, fallback_from) == ("int8", "")
            np.testing.assert_array_equal(out, served)  # the served precision's answer
        precision, out = _http_infer(gw.http_url, "tiny")
        assert precision == "int8"
        np.testing.assert_array_equal(out, served)

        def samples() -> tuple[float, float]:
            rows = _series(gw, "precision_serve_shadow_comparisons_total", **COMPARED)
            return rows / len(X), _series(gw, "precision_serve_shadow_dropped_total", model="tiny")

        wait_ready(lambda: sum(samples()) >= n + 1, 20, "every mirrored sample compared or dropped")
        compared, dropped = samples()
        after = _stats(gw)
        # a sample more than 8 in flight is dropped (counted); one at a time, most are compared
        assert compared + dropped == n + 1 and compared >= n / 2, (compared, dropped)
        agreeing = _series(
            gw, "precision_serve_shadow_comparisons_total", **COMPARED, top1_agree="true"
        )
        assert agreeing == compared * agreeing_rows  # the same inputs each time
        assert _series(gw, "precision_serve_shadow_cosine_count", **COMPARED) == compared * len(X)
        # the mirrors went to the control plane (gRPC and HTTP), none to Triton's fp32 directly,
        # and no client request reached the control plane or its request metrics
        assert after["control_shadow"] - before.get("control_shadow", 0) == n
        assert after["control_shadow_http"] - before.get("control_shadow_http", 0) == 1
        assert after["control_grpc"] == before["control_grpc"]
        assert after["tiny_fp32"] == before["tiny_fp32"]
        for name in ("precision_serve_requests_total", "precision_serve_routing_decisions_total"):
            assert _series(gw, name, model="tiny") == 0, name
        # Envoy's own count of what its shadow policy routed (the routing panel's series)
        routed = {
            protocol: _series(
                gw,
                "precision_serve_envoy_routed_requests_total",
                model="tiny",
                precision="int8",
                protocol=protocol,
                policy="shadow",
            )
            for protocol in ("grpc", "http")
        }
        assert routed == {"grpc": n, "http": 1}, routed
        # the cost: each compared sample ran the served precision once more and the reference
        assert _successes(direct, "tiny_int8") - runs["tiny_int8"] == (n + 1) + compared
        assert _successes(direct, "tiny_fp32") - runs["tiny_fp32"] == compared
        client.close()
    direct.close()


def test_a_failing_reference_never_affects_clients(
    tiny_repository: Path, start_triton: StartTriton, tmp_path: Path
) -> None:
    """The reference unloaded in Triton: every sample fails in the control plane (counted as
    dropped, nothing compared), and clients get the served precision as before."""
    triton = start_triton(tiny_repository, model_control="explicit")
    direct = grpcclient.InferenceServerClient(triton.grpc_url)
    served = direct.infer("tiny_int8", [_input()]).as_numpy("logits")
    args = ["--upstream", f"triton://{triton.grpc_url}?front=envoy", *_routing(tmp_path, SHADOW)]
    n = 20
    with GatewayProcess(tiny_repository, extra_args=args) as gw:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        direct.unload_model("tiny_fp32")
        wait_ready(lambda: not direct.is_model_ready("tiny_fp32"), 15, "tiny_fp32 unloaded")
        for _ in range(n):
            precision, fallback_from, out = _infer(client, "tiny")
            assert (precision, fallback_from) == ("int8", "")
            np.testing.assert_array_equal(out, served)

        def dropped() -> float:
            return sum(
                _series(gw, "precision_serve_shadow_dropped_total", model="tiny", reason=r)
                for r in ("unready", "failed", "busy")
            )

        wait_ready(lambda: dropped() >= n, 20, "every sample dropped")
        assert dropped() == n
        assert _series(gw, "precision_serve_shadow_comparisons_total", model="tiny") == 0
        assert _series(gw, "precision_serve_requests_total", model="tiny") == 0
        client.close()
    direct.close()


def test_the_token_is_checked_in_envoy_before_the_body(
    tiny_repository: Path, start_triton: StartTriton, tmp_path: Path
) -> None:
    triton = start_triton(tiny_repository)
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    url = f"triton://{triton.grpc_url}?front=envoy"
    args = ["--upstream", url, "--auth-token-file", str(token)]
    with GatewayProcess(tiny_repository, extra_args=args) as gw:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        before = _stats(gw)
        for headers in (None, {"authorization": "Bearer wrong"}):
            with pytest.raises(InferenceServerException) as refused:
                _infer(client, "tiny_int8", headers=headers)
            assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
            assert "bearer token" in refused.value.message()
        assert _stats(gw) == before  # refused in Envoy: neither Triton nor Python saw them
        ok = {"authorization": "Bearer s3cret"}
        assert _infer(client, "tiny_int8", headers=ok)[0] == "int8"
        assert _infer(client, "tiny", headers=ok)[0] == "fp32"
        client.close()


def _children(pid: int) -> list[int]:
    """``pid``'s child processes (started by any of its threads)."""
    return sorted(
        int(c)
        for task in Path(f"/proc/{pid}/task").iterdir()
        for c in (task / "children").read_text().split()
    )


def test_a_crashed_envoy_is_started_again_on_the_same_ports(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    triton = start_triton(tiny_repository)
    with GatewayProcess(
        tiny_repository, extra_args=["--upstream", f"triton://{triton.grpc_url}?front=envoy"]
    ) as gw:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        assert _infer(client, "tiny_fp16")[0] == "fp16"
        (envoy,) = _children(gw.pid)
        os.kill(envoy, signal.SIGKILL)

        def serves_again() -> bool:
            return (
                _children(gw.pid) not in ([], [envoy]) and _infer(client, "tiny_fp16")[0] == "fp16"
            )

        wait_ready(serves_again, 30, "Envoy started again")
        assert gw.proc is not None and gw.proc.poll() is None
        assert "starting it again" in gw.log()
        client.close()


def test_python_front_on_request(tiny_repository: Path, start_triton: StartTriton) -> None:
    """``?front=python``: no Envoy, the gateway listens and forwards itself."""
    triton = start_triton(tiny_repository)
    args = ["--upstream", f"triton://{triton.grpc_url}?front=python"]
    with GatewayProcess(tiny_repository, extra_args=args) as gw:
        assert "envoy_admin_port" not in gw.ports and _children(gw.pid) == []
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        assert _infer(client, "tiny", precision="int8")[0] == "int8"
        client.close()


def test_auto_front_keeps_python_in_front_of_a_triton_that_crashes_on_cancels(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    """The default ``front=auto``: nvidia-pytriton's tritonserver (2.51) can crash when a call
    is cancelled and Envoy passes cancellations on, so the Python front (which detaches them)
    runs and says why; ``cancel=propagate`` accepts cancellations, so Envoy runs."""
    triton = start_triton(tiny_repository)
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    version = client.get_server_metadata().version
    client.close()
    assert crashes_on_cancel(version), version  # the Triton these tests run
    for query, envoy in (("", False), ("?cancel=propagate", True)):
        args = ["--upstream", f"triton://{triton.grpc_url}{query}"]
        with GatewayProcess(tiny_repository, extra_args=args) as gw:
            assert ("envoy_admin_port" in gw.ports) == envoy, query
            assert bool(_children(gw.pid)) == envoy, query
            said = "tritonserver < 2.53 can crash when a call is cancelled" in gw.log()
            assert said != envoy, query
            assert f"{triton.grpc_url} ({version})" in gw.log() or envoy
            c = grpcclient.InferenceServerClient(gw.grpc_url)
            assert _infer(c, "tiny", precision="int8")[0] == "int8"
            c.close()


def test_auto_front_without_envoy_installed_keeps_python(
    tiny_repository: Path, start_triton: StartTriton, tmp_path: Path
) -> None:
    """``front=auto`` with Envoy not installed (an ``envoy`` module that cannot be imported
    shadows the wheel's): the Python front serves and the log says why; ``front=envoy`` refuses
    to start."""
    fake = tmp_path / "no_envoy"
    fake.mkdir()
    (fake / "envoy.py").write_text('raise ImportError("no envoy here (test)")\n')
    triton = start_triton(tiny_repository)
    env = {"PYTHONPATH": str(fake)}
    args = ["--upstream", f"triton://{triton.grpc_url}?cancel=propagate"]
    with GatewayProcess(tiny_repository, extra_args=args, env=env) as gw:
        assert "envoy_admin_port" not in gw.ports and _children(gw.pid) == []
        assert "front=auto: the Python front, not Envoy" in gw.log()
        assert "precision-serve[envoy]" in gw.log()
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        assert _infer(client, "tiny", precision="int8")[0] == "int8"
        client.close()
    forced = ["--upstream", f"triton://{triton.grpc_url}?front=envoy"]
    with (
        pytest.raises(RuntimeError, match=r"precision-serve\[envoy\]"),
        GatewayProcess(tiny_repository, extra_args=forced, env=env, timeout=60),
    ):
        pass


def test_crashes_on_cancel_by_version() -> None:
    assert crashes_on_cancel("2.51.0") and crashes_on_cancel("2.52.1")
    assert not crashes_on_cancel("2.53.0") and not crashes_on_cancel("2.61.0")
    assert not crashes_on_cancel("3.0") and not crashes_on_cancel("kserve")


def test_a_60_mb_request_is_refused_in_envoy_and_health_still_answers(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    import grpc
    from tritonclient.grpc import service_pb2 as pb

    triton = start_triton(tiny_repository)
    with GatewayProcess(
        tiny_repository, extra_args=["--upstream", f"triton://{triton.grpc_url}?front=envoy"]
    ) as gw:
        before = _stats(gw)
        options = [("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(gw.grpc_url, options=options) as channel:
            call = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            for model in ("tiny_int8", "tiny", "no_such_model"):
                request = pb.ModelInferRequest(model_name=model)
                request.raw_input_contents.append(bytes(60_000_000))
                with pytest.raises(grpc.RpcError) as refused:
                    call(request, timeout=30)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, model
                ready = urllib.request.urlopen(f"http://{gw.http_url}/v2/health/ready", timeout=5)
                assert ready.status == 200
        after = _stats(gw)
        for cluster in ("tiny_int8", "tiny_fp16", "tiny_fp32", "control_grpc"):
            assert after[cluster] == before[cluster], cluster  # nothing reached Triton or Python


def test_nvidia_example_clients_through_the_envoy_front(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    """NVIDIA's example clients' checks (tests/server/test_nvidia_examples.py), unchanged,
    against the Envoy front with model control on."""
    from tests.server.test_nvidia_examples import run_checks

    triton = start_triton(tiny_repository, model_control="explicit")
    args = ["--upstream", f"triton://{triton.grpc_url}?front=envoy", "--model-control", "explicit"]
    with GatewayProcess(tiny_repository, extra_args=args) as gw:
        assert "envoy_admin_port" in gw.ports
        grpc = grpcclient.InferenceServerClient(gw.grpc_url)
        http = httpclient.InferenceServerClient(gw.http_url)
        for script, client in (
            ("simple_grpc_health_metadata.py", grpc),
            ("simple_http_health_metadata.py", http),
            ("simple_http_model_control.py", http),
        ):
            code, printed = run_checks(script, triton_client=client)
            assert code is None, (script, printed)
        code, printed = run_checks("simple_grpc_model_control.py", triton_client=grpc)
        assert code == 0 and printed == ["PASS: model control"], printed
        code, printed = run_checks(
            "simple_http_infer_client.py",
            httpclient=httpclient,
            triton_client=http,
            input0_data=np.arange(16, dtype=np.int32)[None, :],
            input1_data=np.full((1, 16), -1, dtype=np.int32),
        )
        assert code is None and printed[0].startswith("[404] Request for unknown model"), printed
        # and a real inference through the same front, by tritonclient as it is
        assert _infer(grpc, "tiny", precision="int8")[0] == "int8"


def _gone(pid: int) -> bool:
    """Exited (reaped, or a zombie waiting for its new parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_envoy_goes_when_the_gateway_is_killed(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    """No Envoy is left holding the ports after a SIGKILLed gateway (parent-death signal)."""
    triton = start_triton(tiny_repository)
    with GatewayProcess(
        tiny_repository, extra_args=["--upstream", f"triton://{triton.grpc_url}?front=envoy"]
    ) as gw:
        (envoy,) = _children(gw.pid)
        os.kill(gw.pid, signal.SIGKILL)
        wait_ready(lambda: _gone(envoy), 10, "Envoy to exit after its gateway")


def _runtime_value(gw: GatewayProcess, key: str) -> str | None:
    url = f"http://127.0.0.1:{gw.ports['envoy_admin_port']}/runtime"
    entries = json.loads(urllib.request.urlopen(url, timeout=5).read())["entries"]
    return entries.get(key, {}).get("final_value")


def test_a_split_follows_the_variants_readiness(
    tiny_repository: Path, start_triton: StartTriton, tmp_path: Path
) -> None:
    """Health-driven weights: the control plane sees a variant unready (its readiness checks)
    and moves the split's first attempts away from it in Envoy; back when it is ready."""
    triton = start_triton(tiny_repository, model_control="explicit")
    split = {"models": {"tiny": {"policy": "split", "weights": {"int8": 50, "fp16": 50}}}}
    args = ["--upstream", f"triton://{triton.grpc_url}?front=envoy", *_routing(tmp_path, split)]
    direct = grpcclient.InferenceServerClient(triton.grpc_url)
    with GatewayProcess(tiny_repository, extra_args=args) as gw:
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        key = "ps.split.tiny.0"  # fp16's share (routes most accurate first), cumulative
        wait_ready(lambda: _runtime_value(gw, key) == "50", 10, "the split set in Envoy")
        direct.unload_model("tiny_int8")
        wait_ready(lambda: _runtime_value(gw, key) == "100", 15, "int8's share moved to fp16")
        before = _stats(gw)
        answers = [_infer(client, "tiny")[:2] for _ in range(30)]
        assert set(answers) == {("fp16", "")}  # routed there first: no failed int8 attempts
        assert _stats(gw)["tiny_int8"] == before["tiny_int8"]
        direct.load_model("tiny_int8")
        wait_ready(lambda: _runtime_value(gw, key) == "50", 15, "int8 back in the split")
        assert "int8" in {_infer(client, "tiny")[0] for _ in range(40)}
        client.close()
    direct.close()
