"""server/dataplane/shared_memory.py without a server: a registry over a tmp folder standing in for
/dev/shm, and the gRPC decode hook."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from server.dataplane.shared_memory import SystemSharedMemory, TensorRef
from server.dataplane.tensors import decode
from server.errors import InvalidInput
from server.transports.grpc.service import _wire_tensors


@pytest.fixture
def registry(tmp_path: Path):
    reg = SystemSharedMemory(directory=tmp_path)
    yield reg
    reg.close()


def test_raw_contents_list_only_the_inputs_not_in_shared_memory(tmp_path, registry):
    ids = np.arange(4, dtype=np.int64).reshape(1, 4)
    mask = np.arange(4, 8, dtype=np.int64).reshape(1, 4)
    (tmp_path / "k").write_bytes(b"\0" * 8 + ids.tobytes())
    registry.register("r", "/k", 8, ids.nbytes)
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="input_ids", datatype="INT64", shape=[1, 4])
    t.parameters["shared_memory_region"].string_param = "r"
    t.parameters["shared_memory_byte_size"].int64_param = ids.nbytes
    req.inputs.add(name="attention_mask", datatype="INT64", shape=[1, 4])
    req.raw_input_contents.append(mask.tobytes())
    got_ids, got_mask = _wire_tensors(req, registry)
    np.testing.assert_array_equal(decode(got_ids), ids)
    np.testing.assert_array_equal(decode(got_mask), mask)
    # one raw entry per input not in shared memory, no more
    req.raw_input_contents.append(mask.tobytes())
    with pytest.raises(InvalidInput, match="2 entries for 1 inputs not in shared memory"):
        _wire_tensors(req, registry)


def test_unregister_while_a_request_holds_the_bytes(tmp_path, registry):
    data = np.arange(16, dtype=np.float32)
    (tmp_path / "k").write_bytes(data.tobytes())
    registry.register("r", "k", 0, data.nbytes)
    held = registry.input_tensor("x", "FP32", [16], TensorRef("r", data.nbytes))
    registry.unregister("r")  # no error: unmapped when the request lets go
    np.testing.assert_array_equal(decode(held), data)
    with pytest.raises(InvalidInput, match="'r' is not registered"):
        registry.input_tensor("x", "FP32", [16], TensorRef("r", data.nbytes))
    # the name is free again
    registry.register("r", "k", 0, data.nbytes)
    assert [r.name for r in registry.status()] == ["r"]


def test_large_request_with_an_input_in_shared_memory_passes_the_preflight_scan() -> None:
    """The pre-parse size scan (grpc_contents.check_sizes) leaves requests whose inputs carry
    parameters (shared memory: fewer raw entries than inputs) to the checks after parsing."""
    from server.transports.grpc.contents import PREFLIGHT_BYTES, check_sizes

    big = np.zeros((1, PREFLIGHT_BYTES // 4 + 1), dtype=np.float32)
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="a", datatype="FP32", shape=[1, 4])
    t.parameters["shared_memory_region"].string_param = "r"
    t.parameters["shared_memory_byte_size"].int64_param = 16
    req.inputs.add(name="b", datatype="FP32", shape=list(big.shape))
    req.raw_input_contents.append(big.tobytes())
    check_sizes(req.SerializeToString())  # no error: one raw entry for the one input not in shm
