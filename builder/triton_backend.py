"""Which backend a standard Triton container uses for a variant, from the engine that runs it.

- ``onnxruntime`` -> ``platform: "onnxruntime_onnx"``.
- ``openvino`` -> Triton's OpenVINO backend (``backend: "openvino"``), reading ``model.onnx``
  through ``default_model_filename``, with the engine options as its ``parameters``.

Why the OpenVINO backend and not the ONNX Runtime backend's OpenVINO accelerator
(``optimization.execution_accelerators.cpu_execution_accelerator: [{name: "openvino"}]``):
only the former accepts a precision hint. Sources, read at these commits:

- triton-inference-server/openvino_backend README.md ("Parameters") and src/openvino.cc
  (``ModelState::ParseParameterHelper``), commit db19304291d4b8e52965801cb86b10e536b90450:
  ``HINT_BF16: YES`` -> ``ov::hint::inference_precision(ov::element::bf16)``; also
  ``PERFORMANCE_HINT`` (LATENCY/THROUGHPUT), ``NUM_STREAMS``, ``INFERENCE_NUM_THREADS``;
  ``default_model_filename`` may be ``model.onnx``; with ``max_batch_size > 0`` a request whose
  batch differs from ``max_batch_size`` is an error unless ``ENABLE_BATCH_PADDING: YES``.
- triton-inference-server/onnxruntime_backend README.md ("ONNX Runtime with OpenVINO
  optimization") and src/onnxruntime.cc, commit 00fd3e87a0918193d7921871f2e872efdb8d9c9a: the
  accelerator takes only its ``name``; the backend hard-codes ``device_type = "CPU"`` and passes
  no other OpenVINO option, so a BF16 hint cannot be expressed there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

OPENVINO_BACKEND = "openvino"
ONNXRUNTIME_PLATFORM = "onnxruntime_onnx"


def openvino_parameters(options: Mapping[str, Any], batching: bool) -> dict[str, str]:
    """Triton OpenVINO backend parameters equivalent to the ``openvino`` engine's options."""
    params: dict[str, str] = {
        "PERFORMANCE_HINT": str(options.get("performance_hint", "LATENCY")).upper(),
    }
    if str(options.get("inference_precision", "f32")).lower() == "bf16":
        params["HINT_BF16"] = "YES"
    if options.get("num_streams") is not None:
        params["NUM_STREAMS"] = str(options["num_streams"]).upper()
    if batching:
        # Without it the backend rejects any batch other than max_batch_size (see above).
        params["ENABLE_BATCH_PADDING"] = "YES"
    return params


def standard_backend(
    engine: str, options: Mapping[str, Any], model_filename: str, max_batch_size: int
) -> dict[str, Any]:
    """Keyword arguments for :func:`common.model_repository.build_model_config`."""
    if engine == OPENVINO_BACKEND:
        return {
            "platform": "",
            "backend": OPENVINO_BACKEND,
            "default_model_filename": model_filename,
            "parameters": openvino_parameters(options, max_batch_size > 0),
        }
    return {"platform": ONNXRUNTIME_PLATFORM}
