"""OpenVINO engine (CPU): runs an ONNX file or an OpenVINO IR (``.xml``) with a precision hint.

Options (all optional):

- ``inference_precision``: ``"f32"`` | ``"bf16"`` -> OpenVINO's ``INFERENCE_PRECISION_HINT``.
  On a CPU without native BF16 (no AMX-BF16 / AVX512-BF16) OpenVINO's CPU plugin keeps f32;
  :attr:`OpenVinoSession.effective_precision` reports what the compiled model really uses.
- ``performance_hint``: ``"LATENCY"`` (default) | ``"THROUGHPUT"`` -> ``PERFORMANCE_HINT``.
- ``num_streams``: an int, or ``"AUTO"`` -> ``NUM_STREAMS``.
- ``dynamic_batch``: ``True`` (default) makes a static first input dimension dynamic where the
  model allows it, so any batch size runs.

``threads`` > 0 -> ``INFERENCE_NUM_THREADS``. ``run`` is thread-safe: each call borrows an
``InferRequest`` from a pool (creating one when all are busy) and OpenVINO releases the GIL
while it computes. Outputs are keyed by the model's (ONNX) output names and carry the dtypes the
model file declares.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.engines.base import EngineError, IOSpec, importable

log = logging.getLogger(__name__)

PRECISIONS = ("f32", "bf16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
KNOWN_OPTIONS = ("inference_precision", "performance_hint", "num_streams", "dynamic_batch")


def _dim(d: Any) -> int:
    return -1 if d.is_dynamic else int(d.get_length())


def _port_spec(port: Any) -> IOSpec:
    names = port.get_names()
    name = port.get_any_name() if names else ""
    dtype = np.dtype(port.get_element_type().to_dtype())
    return IOSpec(name, dtype, tuple(_dim(d) for d in port.get_partial_shape()))


def _with_shapes(declared: list[IOSpec], ports: Any) -> list[IOSpec]:
    return [
        IOSpec(d.name, d.dtype, _port_spec(p).shape) for d, p in zip(declared, ports, strict=True)
    ]


def compile_properties(options: Mapping[str, Any], threads: int) -> dict[str, Any]:
    """OpenVINO CPU properties for the engine options (validated; errors name the option)."""
    unknown = sorted(set(options) - set(KNOWN_OPTIONS))
    if unknown:
        raise EngineError(
            f"openvino: unknown option(s) {', '.join(unknown)}; known: {', '.join(KNOWN_OPTIONS)}"
        )
    props: dict[str, Any] = {}
    precision = str(options.get("inference_precision", "f32")).lower()
    if precision not in PRECISIONS:
        raise EngineError(
            f"openvino: inference_precision must be one of {', '.join(PRECISIONS)}, "
            f"got {options['inference_precision']!r}"
        )
    props["INFERENCE_PRECISION_HINT"] = precision
    hint = str(options.get("performance_hint", "LATENCY")).upper()
    if hint not in PERFORMANCE_HINTS:
        raise EngineError(
            f"openvino: performance_hint must be one of {', '.join(PERFORMANCE_HINTS)}, "
            f"got {options['performance_hint']!r}"
        )
    props["PERFORMANCE_HINT"] = hint
    streams = options.get("num_streams")
    if streams is not None:
        if str(streams).upper() == "AUTO":
            props["NUM_STREAMS"] = "AUTO"
        else:
            try:
                n = int(streams)
            except (TypeError, ValueError):
                n = 0
            if n < 1:
                raise EngineError(f"openvino: num_streams must be >= 1 or 'AUTO', got {streams!r}")
            props["NUM_STREAMS"] = n
    if threads and threads > 0:
        props["INFERENCE_NUM_THREADS"] = int(threads)
    return props


def _make_batch_dynamic(model: Any) -> bool:
    """Give every input with a static first dimension a dynamic one; False if the model refuses
    (it is then left as it was)."""
    import openvino as ov

    shapes = {}
    for port in model.inputs:
        shape = port.get_partial_shape()
        if shape.rank.is_dynamic or len(shape) == 0 or shape[0].is_dynamic:
            continue
        dims = [ov.Dimension(-1)] + [shape[i] for i in range(1, len(shape))]
        shapes[port] = ov.PartialShape(dims)
    if not shapes:
        return True
    try:
        model.reshape(shapes)
    except Exception as e:  # OpenVINO raises its own types
        log.info("openvino: batch dimension stays static (%s)", e)
        return False
    return True


class OpenVinoSession:
    def __init__(self, compiled: Any, inputs: list[IOSpec], outputs: list[IOSpec]) -> None:
        self._compiled = compiled
        self.inputs = inputs
        self.outputs = outputs
        import openvino

        self._ov = openvino
        self._pool: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # What the CPU plugin really computes in ("f32" where BF16 is not native).
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        self.effective_precision = getattr(hint, "get_type_name", lambda: str(hint))()

    def _check(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            if spec.name not in feeds:
                raise EngineError(f"openvino: input {spec.name!r} is missing")
            arr = np.asarray(feeds[spec.name])
            if arr.dtype != spec.dtype:
                raise EngineError(
                    f"openvino: input {spec.name!r} expects {spec.dtype.name}, got {arr.dtype.name}"
                )
            if arr.ndim != len(spec.shape):
                raise EngineError(
                    f"openvino: input {spec.name!r} expects rank {len(spec.shape)} "
                    f"{list(spec.shape)}, got shape {list(arr.shape)}"
                )
            out[spec.name] = np.ascontiguousarray(arr)
        extra = sorted(set(feeds) - {s.name for s in self.inputs})
        if extra:
            raise EngineError(f"openvino: unknown input(s) {', '.join(map(repr, extra))}")
        return out

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        checked = self._check(feeds)
        try:
            request = self._pool.get_nowait()
        except queue.Empty:
            request = self._compiled.create_infer_request()
        try:
            # The low-level calls cost a third of InferRequest.infer(dict) per call here; inputs
            # are shared (no copy), outputs copied out of the request before it is reused.
            for i, spec in enumerate(self.inputs):
                request.set_input_tensor(i, self._ov.Tensor(checked[spec.name], shared_memory=True))
            request.infer()  # releases the GIL while OpenVINO computes
            out = {}
            for i, spec in enumerate(self.outputs):
                value = np.array(request.get_output_tensor(i).data, copy=True)
                out[spec.name] = value if value.dtype == spec.dtype else value.astype(spec.dtype)
        except EngineError:
            raise
        except Exception as e:  # OpenVINO raises its own exception types
            raise EngineError(f"openvino failed: {e}") from e
        finally:
            self._pool.put(request)
        return out


class OpenVinoEngine:
    """OpenVINO on the CPU; see the module docstring for the options."""

    name = "openvino"

    def available(self) -> bool:
        return importable("openvino")

    def load(
        self, path: Path, options: Mapping[str, Any] | None = None, threads: int = 0
    ) -> OpenVinoSession:
        try:
            import openvino as ov
        except ImportError as e:
            raise EngineError(f"engine 'openvino' is not installed ({e})") from e

        options = dict(options or {})
        props = compile_properties(options, threads)
        path = Path(path)
        if not path.is_file():
            raise EngineError(f"openvino cannot load {path}: no such file")
        core = ov.Core()
        try:
            model = core.read_model(str(path))
        except Exception as e:
            raise EngineError(f"openvino cannot load {path}: {e}") from e
        # Names and dtypes as the file declares them (before compilation may change types);
        # shapes after the batch dimension was made dynamic.
        declared_inputs = [_port_spec(p) for p in model.inputs]
        declared_outputs = [_port_spec(p) for p in model.outputs]
        if options.get("dynamic_batch", True):
            _make_batch_dynamic(model)
        inputs = _with_shapes(declared_inputs, model.inputs)
        outputs = _with_shapes(declared_outputs, model.outputs)
        try:
            compiled = core.compile_model(model, "CPU", props)
        except Exception as e:
            raise EngineError(f"openvino cannot compile {path}: {e}") from e
        return OpenVinoSession(compiled, inputs, outputs)
