"""Triton python-backend model: runs one precision-serve variant through ``common.engines``.

The launcher copies this file as ``<variant>/<version>/model.py`` into the repository it derives
for the ``nvidia-pytriton`` Triton (which has no onnxruntime backend). The variant's
``config.pbtxt`` names the engine, its options and the model file in ``parameters``, so the
variant runs on the same engine with the same options as in the embedded upstream and the builder.
Triton's python-backend stub imports it; the launcher puts our package and the virtual
environment's site-packages on the stub's ``PYTHONPATH``.

Dynamic batching hands ``execute`` several requests at once: requests whose non-batch shapes
and dtypes agree are concatenated into one engine run and the outputs split back per request.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.engines import get_engine

# config.pbtxt parameters written by server.launcher.derive
PARAM_ENGINE = "precision_serve_engine"
PARAM_ENGINE_OPTIONS = "precision_serve_engine_options"
PARAM_MODEL_FILE = "precision_serve_model_file"
PARAM_THREADS = "precision_serve_threads"

Feeds = dict[str, np.ndarray]


def config_parameters(model_config: dict[str, Any]) -> dict[str, str]:
    """``parameters`` of a model config (Triton's JSON form) as plain strings."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def _signature(feeds: Feeds) -> tuple:
    return tuple((n, a.dtype.str, a.shape[1:]) for n, a in sorted(feeds.items()))


def group_compatible(feeds_list: Sequence[Feeds]) -> list[list[int]]:
    """Indices of requests that can share one batched run (same non-batch shapes and dtypes)."""
    groups: dict[tuple, list[int]] = {}
    for i, feeds in enumerate(feeds_list):
        groups.setdefault(_signature(feeds), []).append(i)
    return list(groups.values())


def merge_feeds(feeds_list: Sequence[Feeds]) -> tuple[Feeds, list[int]]:
    """Concatenate compatible requests along the batch axis; returns the feeds and row counts."""
    rows = [len(next(iter(f.values()))) if f else 0 for f in feeds_list]
    if len(feeds_list) == 1:
        return dict(feeds_list[0]), rows
    names = list(feeds_list[0])
    return {n: np.concatenate([f[n] for f in feeds_list], axis=0) for n in names}, rows


def split_outputs(outputs: Feeds, rows: Sequence[int]) -> list[Feeds]:
    """Undo :func:`merge_feeds` on the outputs of one batched run."""
    if len(rows) == 1:
        return [outputs]
    bounds = np.cumsum([0, *rows])
    return [{n: a[bounds[i] : bounds[i + 1]] for n, a in outputs.items()} for i in range(len(rows))]


class TritonPythonModel:
    """The class Triton's python backend instantiates once per model instance."""

    def initialize(self, args: dict[str, str]) -> None:
        self._pb = importlib.import_module("triton_python_backend_utils")  # provided by the stub
        config = json.loads(args["model_config"])
        params = config_parameters(config)
        missing = [
            p for p in (PARAM_ENGINE, PARAM_MODEL_FILE) if not params.get(p)
        ]  # a config not derived by server.launcher.derive
        if missing:
            raise ValueError(f"model {config.get('name')!r}: config lacks parameters {missing}")
        options = json.loads(params.get(PARAM_ENGINE_OPTIONS) or "{}")
        threads = int(params.get(PARAM_THREADS) or 0)
        engine = get_engine(params[PARAM_ENGINE])
        self._session = engine.load(Path(params[PARAM_MODEL_FILE]), options, threads)
        self._name = config.get("name", "")
        self._batching = int(config.get("max_batch_size", 0)) > 0
        self._inputs = [t["name"] for t in config.get("input", [])]
        self._outputs = [t["name"] for t in config.get("output", [])]

    def _feeds(self, request: Any) -> Feeds:
        feeds: Feeds = {}
        for name in self._inputs:
            tensor = self._pb.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"model {self._name!r}: input {name!r} is missing")
            feeds[name] = tensor.as_numpy()
        return feeds

    def _response(self, outputs: Feeds) -> Any:
        tensors = [self._pb.Tensor(n, np.ascontiguousarray(outputs[n])) for n in self._outputs]
        return self._pb.InferenceResponse(output_tensors=tensors)

    def _error(self, message: str) -> Any:
        return self._pb.InferenceResponse(output_tensors=[], error=self._pb.TritonError(message))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        parsed: dict[int, Feeds] = {}
        for i, request in enumerate(requests):
            try:
                parsed[i] = self._feeds(request)
            except Exception as e:
                responses[i] = self._error(str(e))
        order = list(parsed)
        feeds_list = [parsed[i] for i in order]
        groups = (
            group_compatible(feeds_list) if self._batching else [[k] for k in range(len(order))]
        )
        for group in groups:
            merged, rows = merge_feeds([feeds_list[k] for k in group])
            try:
                outputs = self._session.run(merged)
                per_request = split_outputs(outputs, rows)
            except Exception as e:
                for k in group:
                    responses[order[k]] = self._error(f"model {self._name!r}: {e}")
                continue
            for k, outs in zip(group, per_request, strict=True):
                responses[order[k]] = self._response(outs)
        return responses

    def finalize(self) -> None:
        self._session = None
