"""Precision pools through the Envoy front, against two real tritonservers: each precision's
requests go from Envoy straight to its pool's server (Triton's statistics per server say which),
the fallback chain crosses pools in Envoy, and a precision of the embedded ``--upstream`` is
served by the control plane.

Both servers load the whole repository, as two pools of one repository would; only the routing
file decides which one serves a precision."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import yaml

from common.process import wait_ready
from server.runtime.runner import GatewayProcess
from tests.triton.conftest import StartTriton
from tests.triton.load import successes
from tests.triton.test_envoy_front import _http_infer, _infer, _input, _stats

pytestmark = pytest.mark.integration


def test_each_pool_serves_its_precisions_through_envoy_and_the_chain_crosses_pools(
    tiny_repository: Path, start_triton: StartTriton, tmp_path: Path
) -> None:
    a = start_triton(tiny_repository, model_control="explicit")  # pool "a": int8
    b = start_triton(tiny_repository)  # pool "b": fp16, found by (DNS) name
    routing = tmp_path / "routing.yaml"
    routing.write_text(
        yaml.safe_dump(
            {
                "pools": {
                    # each pool's own HTTP port: HTTP inference in Envoy too
                    "a": f"triton://{a.grpc_url}?http={a.http_port}&front=envoy",
                    # localhost: 127.0.0.1 and ::1 (nothing there: kept out by the health check)
                    "b": f"triton+dns://localhost:{b.grpc_port}?interval=1&http={b.http_port}"
                    "&front=envoy",
                },
                "models": {
                    "tiny": {
                        "precision": "int8",
                        "fallback": ["int8", "fp16"],
                        # fp32: no pool, the --upstream (embedded, the default)
                        "precision_pools": {"int8": "a", "fp16": "b"},
                    }
                },
            }
        )
    )

    def counts() -> dict[tuple[str, str], int]:
        return {
            (pool, p): successes(t.grpc_url, f"tiny_{p}")
            for pool, t in (("a", a), ("b", b))
            for p in ("int8", "fp16", "fp32")
        }

    with grpcclient.InferenceServerClient(b.grpc_url) as other:
        other.infer("tiny_int8", [_input()])  # b's own count of a variant of pool a

    with GatewayProcess(tiny_repository, extra_args=["--routing", str(routing)]) as gw:
        assert "envoy_admin_port" in gw.ports  # the Envoy front, pools and all
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        before, envoy = counts(), _stats(gw)
        assert _infer(client, "tiny_int8")[:2] == ("int8", "")  # a variant by name
        assert _infer(client, "tiny", precision="int8")[:2] == ("int8", "")  # the parameter
        assert _infer(client, "tiny")[:2] == ("int8", "")  # the policy: fixed int8
        assert _infer(client, "tiny", headers={"x-precision": "fp16"})[:2] == ("fp16", "")
        assert _http_infer(gw.http_url, "tiny", {"x-precision": "fp16"})[0] == "fp16"
        assert _http_infer(gw.http_url, "tiny_int8")[0] == "int8"
        after = counts()
        assert {k: after[k] - before[k] for k in after} == {
            ("a", "int8"): 4,
            ("a", "fp16"): 0,
            ("a", "fp32"): 0,
            ("b", "int8"): 0,
            ("b", "fp16"): 2,
            ("b", "fp32"): 0,
        }
        routed = _stats(gw)
        assert routed["control_grpc"] == envoy["control_grpc"]  # Python saw none of them
        assert routed["control_http"] == envoy["control_http"]
        assert "tiny_fp32" not in routed  # no cluster: the embedded pool is not Envoy's

        # the gateway's statistics of a pool's variant are that pool's server's own (b's
        # tiny_int8 has served a request too, not through the gateway: not counted)
        assert successes(b.grpc_url, "tiny_int8") >= 1
        (entry,) = client.get_inference_statistics("tiny_int8").model_stats
        assert entry.inference_stats.success.count == successes(a.grpc_url, "tiny_int8")
        (entry,) = client.get_inference_statistics("tiny_fp16").model_stats
        assert entry.inference_stats.success.count == successes(b.grpc_url, "tiny_fp16")

        # the embedded precision: the control plane serves it (ONNX Runtime in the gateway)
        control = _stats(gw)["control_grpc"]
        precision, _, out = _infer(client, "tiny", precision="fp32")
        assert precision == "fp32"
        reference = grpcclient.InferenceServerClient(a.grpc_url)
        want = reference.infer("tiny_fp32", [_input()]).as_numpy("logits")
        reference.close()
        np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)  # the same model, in ORT
        assert _infer(client, "tiny_fp32")[0] == "fp32"
        assert _stats(gw)["control_grpc"] - control == 2
        # neither Triton served them (a's fp32: the reference asked directly above)
        assert counts() == {**after, ("a", "fp32"): after[("a", "fp32")] + 1}

        # fallback across pools in Envoy: int8 unloaded in pool a (NOT_FOUND) -> fp16 in b
        direct = grpcclient.InferenceServerClient(a.grpc_url)
        direct.unload_model("tiny_int8")
        wait_ready(lambda: not direct.is_model_ready("tiny_int8"), 15, "tiny_int8 unloaded")
        fp16 = successes(b.grpc_url, "tiny_fp16")
        assert _infer(client, "tiny", precision="int8")[:2] == ("fp16", "int8")
        assert _http_infer(gw.http_url, "tiny", {"x-precision": "int8"})[0] == "fp16"
        assert successes(b.grpc_url, "tiny_fp16") == fp16 + 2
        direct.load_model("tiny_int8")
        assert _infer(client, "tiny")[:2] == ("int8", "")
        direct.close()

        # ... and across a killed server (connection refused in pool a)
        a.kill()
        assert _infer(client, "tiny")[:2] == ("fp16", "int8")
        assert successes(b.grpc_url, "tiny_fp16") == fp16 + 3
        assert _stats(gw)["control_grpc"] - control == 2  # all in Envoy
        client.close()


def test_pools_on_the_python_front_on_request(
    tiny_repository: Path, start_triton: StartTriton, tmp_path: Path
) -> None:
    """``?front=python`` on every Triton pool: no Envoy; the gateway forwards to the pools."""
    a = start_triton(tiny_repository)
    routing = tmp_path / "routing.yaml"
    routing.write_text(
        yaml.safe_dump(
            {
                "pools": {"a": f"triton://{a.grpc_url}?front=python"},
                "models": {"tiny": {"precision_pools": {"int8": "a"}}},
            }
        )
    )
    with GatewayProcess(tiny_repository, extra_args=["--routing", str(routing)]) as gw:
        assert "envoy_admin_port" not in gw.ports
        with urllib.request.urlopen(f"http://{gw.http_url}/v2/models/tiny_int8/ready") as r:
            assert r.status == 200
        client = grpcclient.InferenceServerClient(gw.grpc_url)
        before = successes(a.grpc_url, "tiny_int8")
        assert _infer(client, "tiny", precision="int8")[0] == "int8"
        assert successes(a.grpc_url, "tiny_int8") == before + 1
        client.close()
