"""The real demo variants (digits: fp32/fp16/int8 from the builder) through the gateway equal the
same engine run directly on the same rows, over gRPC and HTTP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from common.engines import get_engine
from common.model_repository import load_manifests
from server.runtime.runner import GatewayProcess

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_every_digits_variant_matches_direct_engine_outputs(digits_repository: Path):
    manifest = load_manifests(digits_repository)["digits"]
    samples = np.load(digits_repository / "digits.samples.npz")
    spec = manifest.inputs[0]
    x = samples[spec.name][:8].astype(spec.dtype)
    out_name = manifest.outputs[0].name
    assert {"fp32", "fp16", "int8"} <= set(manifest.variants)
    with GatewayProcess(digits_repository, timeout=120) as gw:
        g = grpcclient.InferenceServerClient(gw.grpc_url)
        h = httpclient.InferenceServerClient(gw.http_url)
        for precision, record in manifest.variants.items():
            session = get_engine(record.engine).load(
                digits_repository / record.file, record.engine_options
            )
            want = session.run({spec.name: x})[out_name]
            gi = grpcclient.InferInput(spec.name, list(x.shape), "FP32")
            gi.set_data_from_numpy(x)
            got = g.infer(record.triton_name, [gi]).as_numpy(out_name)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=precision)
            hi = httpclient.InferInput(spec.name, list(x.shape), "FP32")
            hi.set_data_from_numpy(x)
            got = h.infer(record.triton_name, [hi]).as_numpy(out_name)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=precision)
            # and through the logical name with the precision parameter
            routed = g.infer("digits", [gi], parameters={"precision": precision})
            assert routed.get_response().model_name == record.triton_name
            np.testing.assert_allclose(routed.as_numpy(out_name), want, rtol=1e-4, atol=1e-5)
        # the digits samples are labelled held-out rows: the served default answers most right
        assert "__labels__" in samples.files, f"digits samples have no labels: {samples.files}"
        labels = samples["__labels__"][:8]
        assert labels.shape == (8,) and set(labels.tolist()) <= set(range(10)), labels
        gi = grpcclient.InferInput(spec.name, list(x.shape), "FP32")
        gi.set_data_from_numpy(x)
        logits = g.infer("digits", [gi]).as_numpy(out_name)
        assert np.mean(np.argmax(logits, axis=1) == labels) >= 0.75
