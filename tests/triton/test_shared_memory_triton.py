"""System shared memory with a Triton upstream: the gateway reads the client's region and sends
the data on (replicas may be on other hosts), so a shm request is decoded, never passed through
with parameters naming a region the replica does not have."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm

from server.runtime.runner import GatewayProcess
from tests.server.conftest import ort_outputs, rows
from tests.triton.conftest import StartTriton

pytestmark = pytest.mark.integration


def test_shared_memory_through_a_triton_upstream(
    tiny_repository: Path, start_triton: StartTriton
) -> None:
    triton = start_triton(tiny_repository)
    args = ["--upstream", f"triton://{triton.grpc_url}?front=envoy"]
    x = rows(3, seed=11)
    key = f"/ps_test_triton_{uuid.uuid4().hex[:8]}"
    handle = shm.create_shared_memory_region("t_io", key, 512, create_only=True)
    try:
        shm.set_shared_memory_region(handle, [x], offset=8)
        with GatewayProcess(tiny_repository, extra_args=args) as gw:
            client = grpcclient.InferenceServerClient(gw.grpc_url)
            client.register_system_shared_memory("t_io", key, 512)
            inp = grpcclient.InferInput("x", [3, 16], "FP32")
            inp.set_shared_memory("t_io", x.nbytes, offset=8)
            out = grpcclient.InferRequestedOutput("logits")
            out.set_shared_memory("t_io", 48, offset=256)
            result = client.infer("tiny", [inp], outputs=[out], parameters={"precision": "fp32"})
            assert result.get_response().model_name == "tiny_fp32"
            want = ort_outputs(tiny_repository, "fp32", x)
            got = shm.get_contents_as_numpy(handle, np.float32, [3, 4], offset=256)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
            # over HTTP too, input in shm and the output over the wire
            http = httpclient.InferenceServerClient(gw.http_url)
            hin = httpclient.InferInput("x", [3, 16], "FP32")
            hin.set_shared_memory("t_io", x.nbytes, offset=8)
            got_http = http.infer("tiny_int8", [hin]).as_numpy("logits")
            want_int8 = ort_outputs(tiny_repository, "int8", x)
            np.testing.assert_allclose(got_http, want_int8, rtol=1e-5, atol=1e-6)
            # the region lives on the gateway only: Triton was never told about it
            triton_client = grpcclient.InferenceServerClient(triton.grpc_url)
            assert not triton_client.get_system_shared_memory_status(as_json=True).get("regions")
            client.unregister_system_shared_memory()
    finally:
        shm.destroy_shared_memory_region(handle)
