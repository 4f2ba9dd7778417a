"""Triton's own words for the errors the gateway answers as Triton would.

Clients written for Triton match on its error text: NVIDIA's example clients check that
``get_model_metadata("wrong_model_name")`` fails with "Request for unknown model" in the message
(simple_{http,grpc}_health_metadata.py) or starting with it (simple_http_infer_client.py), and
"failed to load" after a bad load. So where the gateway refuses a request for a reason Triton
also refuses it for, the message is Triton 2.51's (libtritonserver, r24.10: infer_request.cc,
model.cc, model_repository_manager.cc, tritonserver.cc; the gRPC and HTTP frontends of the
server repository), checked against the ``tritonserver`` binary side by side in
tests/triton/test_wording_triton.py. The gateway's own detail, where it adds any, comes after
Triton's text, so a client's ``in`` or ``startswith`` still matches.

The status codes are the callers' (server/errors.py classes); each function's docstring says
which one Triton answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

# Triton's note after a shape mismatch for a model with a batch dimension (infer_request.cc)
BATCH_NOTE = (
    "NOTE: Setting a non-zero max_batch_size in the model config requires a batch dimension to "
    "be prepended to each input shape. If you want to specify the full shape including the batch "
    "dim in your input dims config, try setting max_batch_size to zero. See the model "
    "configuration docs for more info on max_batch_size."
)
MODEL_NOT_READY = "Model version not ready"  # HTTP GET .../ready, not ready or unknown: 400


def decoupled_refused(protocol: str) -> str:
    """One-response inference on a decoupled model (the LLMs): Triton answers UNSUPPORTED
    (gRPC UNIMPLEMENTED, HTTP 501) in ``src/grpc/infer_handler.cc`` / ``src/http_server.cc``."""
    if protocol == "http":
        return "HTTP end point doesn't support models with decoupled transaction policy"
    return "ModelInfer RPC doesn't support models with decoupled transaction policy"


def _request(request_id: str) -> str:
    """The prefix of the errors Triton finds while checking an inference request."""
    return f"[request id: {request_id or '<id_unknown>'}] "


def dims(shape: Iterable[int]) -> str:
    """A shape as Triton prints it: ``[-1,16]``."""
    return "[" + ",".join(str(int(d)) for d in shape) + "]"


def _names(names: Iterable[str]) -> str:
    return "[" + ",".join(f"'{n}'" for n in names) + "]"


# ---- models and versions (NOT_FOUND / HTTP 404 unless said otherwise) -------------------------
def unknown_model(name: str) -> str:
    return f"Request for unknown model: '{name}' is not found (see the repository index)"


def unknown_version(name: str, version: str) -> str:
    """A model without that version (the gateway serves version 1 only)."""
    return f"Request for unknown model: '{name}' version {version} is not found (only version 1)"


def invalid_version(version: str) -> str:
    """A version that is not a number (gRPC: INVALID_ARGUMENT; Triton's HTTP routes do not match
    it: 404)."""
    return (
        f"failed to get model version from specified version string '{version}', version "
        "should be an integral value > 0"
    )


def negative_version(version: str) -> str:
    """A negative version (gRPC: INVALID_ARGUMENT; HTTP: 404 as above)."""
    return f"invalid model version specified '{version}' , version should be an integral value > 0"


def statistics_unknown_model(name: str) -> str:
    """Statistics of an unknown model: INVALID_ARGUMENT / HTTP 400."""
    return f"requested model '{name}' is not available"


def statistics_unknown_version(name: str) -> str:
    """Statistics of a version the model does not have: INVALID_ARGUMENT / HTTP 400."""
    return f"requested model version is not available for model '{name}'"


def load_failed(name: str, reason: str) -> str:
    """A load that failed (Triton: "failed to load 'x', failed to poll from model repository")."""
    return f"failed to load '{name}', {reason}"


# ---- inference requests (INVALID_ARGUMENT / HTTP 400) -----------------------------------------
def input_count(request_id: str, model: str, expected: Sequence[str], given: Sequence[str]) -> str:
    """Too many or too few inputs (Triton's check of the count comes before the names)."""
    missing = [n for n in expected if n not in given]
    return (
        f"{_request(request_id)}expected {len(expected)} inputs but got {len(given)} inputs for "
        f"model '{model}'. Got input(s) {_names(given)}, but missing required input(s) "
        f"{_names(missing)}. Please provide all required input(s)."
    )


def unexpected_input(name: str, model: str, expected: Iterable[str]) -> str:
    return (
        f"unexpected inference input '{name}' for model '{model}' "
        f"(model inputs: {_names(expected)})"
    )


def duplicate_input(request_id: str, name: str) -> str:
    return f"{_request(request_id)}input '{name}' already exists in request"


def datatype(request_id: str, name: str, given: str, model: str, expected: str) -> str:
    return (
        f"{_request(request_id)}inference input '{name}' data-type is '{given}', but model "
        f"'{model}' expects '{expected}'"
    )


def shape(
    request_id: str, name: str, model: str, expected: Sequence[int], given: Sequence[int]
) -> str:
    """``expected`` with the batch dimension (-1) when the model has one."""
    batched = len(expected) > 0 and expected[0] == -1
    note = f" {BATCH_NOTE}" if batched else ""
    return (
        f"{_request(request_id)}unexpected shape for input '{name}' for model '{model}'. "
        f"Expected {dims(expected)}, got {dims(given)}.{note}"
    )


def no_batch_dim(request_id: str, name: str, model: str) -> str:
    return (
        f"{_request(request_id)}input '{name}' has no shape but model requires batch dimension "
        f"for '{model}'"
    )


def batch_mismatch(request_id: str, name: str, model: str) -> str:
    return (
        f"{_request(request_id)}input '{name}' batch size does not match other inputs for '{model}'"
    )


def batch_too_large(request_id: str, max_batch_size: int, model: str) -> str:
    return (
        f"{_request(request_id)}inference request batch-size must be <= {max_batch_size} for "
        f"'{model}'"
    )


def byte_size(
    request_id: str, name: str, model: str, expected: int, given: int, shape: Sequence[int]
) -> str:
    """Raw bytes that do not fill the input's declared shape (``shape`` and the datatype are the
    gateway's detail)."""
    return (
        f"{_request(request_id)}input byte size mismatch for input '{name}' for model "
        f"'{model}'. Expected {expected}, got {given} (for shape {dims(shape)})"
    )


def unexpected_output(name: str, model: str, outputs: Iterable[str]) -> str:
    return (
        f"unexpected inference output '{name}' for model '{model}' "
        f"(model outputs: {_names(outputs)})"
    )


__all__ = [
    "BATCH_NOTE",
    "MODEL_NOT_READY",
    "batch_mismatch",
    "batch_too_large",
    "byte_size",
    "datatype",
    "dims",
    "duplicate_input",
    "input_count",
    "invalid_version",
    "load_failed",
    "negative_version",
    "no_batch_dim",
    "shape",
    "statistics_unknown_model",
    "statistics_unknown_version",
    "unexpected_input",
    "unexpected_output",
    "unknown_model",
    "unknown_version",
]
