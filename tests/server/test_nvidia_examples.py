"""NVIDIA's own example clients' error checks against the gateway.

The scripts (tests/data/nvidia_examples/, unmodified, README says from where) need Triton's
``simple`` model, so each one's error-checking ``try`` blocks - the statements that name
``wrong_model_name`` - and the functions they call are taken from the script's own syntax tree and
run as they are: the script's calls, its string checks and its ``sys.exit(1)`` on a mismatch.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from server.runtime.runner import GatewayProcess

EXAMPLES = Path(__file__).resolve().parents[1] / "data" / "nvidia_examples"
NEEDLE = "wrong_model_name"


@pytest.fixture(scope="module")
def explicit_gateway(tiny_repository: Path):
    """Model control on: the model-control examples load a model."""
    args = ["--model-control", "explicit", "--upstream", "embedded?threads=1"]
    with GatewayProcess(tiny_repository, extra_args=args) as gw:
        yield gw


def _main_body(tree: ast.Module) -> list[ast.stmt]:
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return node.body
    raise AssertionError("no `if __name__ == '__main__':` block")


def run_checks(script: str, **names: Any) -> tuple[int | None, list[str]]:
    """Run ``script``'s module-level functions and the ``try`` blocks of its main block that
    name ``wrong_model_name`` with ``names`` as globals; returns (the ``sys.exit`` code or None,
    the lines printed)."""
    path = EXAMPLES / script
    tree = ast.parse(path.read_text(), filename=str(path))
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
    blocks = [n for n in _main_body(tree) if isinstance(n, ast.Try) and NEEDLE in ast.unparse(n)]
    assert blocks, f"{script} no longer has its {NEEDLE} check"
    printed: list[str] = []
    scope = {
        "__name__": "nvidia_example",
        "sys": sys,
        "np": np,
        "InferenceServerException": InferenceServerException,
        "print": lambda *args, **kwargs: printed.append(" ".join(map(str, args))),
        **names,
    }
    code = compile(ast.Module(body=[*functions, *blocks], type_ignores=[]), str(path), "exec")
    try:
        exec(code, scope)
    except SystemExit as e:
        return (e.code if isinstance(e.code, int) else 1), printed
    return None, printed


def test_health_metadata_examples_find_request_for_unknown_model(explicit_gateway):
    """simple_{http,grpc}_health_metadata.py: "Request for unknown model" in the message."""
    http = httpclient.InferenceServerClient(explicit_gateway.http_url)
    code, printed = run_checks("simple_http_health_metadata.py", triton_client=http)
    assert code is None, printed
    grpc = grpcclient.InferenceServerClient(explicit_gateway.grpc_url)
    code, printed = run_checks("simple_grpc_health_metadata.py", triton_client=grpc)
    assert code is None, printed


def test_http_infer_example_message_starts_with_request_for_unknown_model(explicit_gateway):
    """simple_http_infer_client.py: inference on a wrong name; the message starts with
    "Request for unknown model" (the script's own inputs, INT32 [1, 16] twice)."""
    code, printed = run_checks(
        "simple_http_infer_client.py",
        httpclient=httpclient,
        triton_client=httpclient.InferenceServerClient(explicit_gateway.http_url),
        input0_data=np.arange(16, dtype=np.int32)[None, :],
        input1_data=np.full((1, 16), -1, dtype=np.int32),
    )
    assert code is None, printed
    # the script prints the exception: Triton's status for an unknown model (404) and words
    assert printed[0].startswith("[404] Request for unknown model: 'wrong_model_name'"), printed


def test_model_control_examples_find_failed_to_load(explicit_gateway):
    """simple_{grpc,http}_model_control.py: loading a wrong name fails with "failed to load"
    (the scripts print "PASS: model control"; the gRPC one then exits 0)."""
    grpc = grpcclient.InferenceServerClient(explicit_gateway.grpc_url)
    code, printed = run_checks("simple_grpc_model_control.py", triton_client=grpc)
    assert code == 0 and printed == ["PASS: model control"], printed
    http = httpclient.InferenceServerClient(explicit_gateway.http_url)
    code, printed = run_checks("simple_http_model_control.py", triton_client=http)
    assert code is None and printed == ["PASS: model control"], printed
