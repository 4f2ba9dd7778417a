"""Steady closed-loop load for the Triton-upstream tests, and what Triton says it served."""

from __future__ import annotations

import threading
import time

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from lab.soak.driver import triton_successes as successes

__all__ = ["Load", "rows_served", "successes"]


def rows_served(url: str, model: str) -> int:
    """Rows Triton inferred for ``model`` (``inference_count``: at least one per request it
    served)."""
    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(model)
    return sum(s.inference_count for s in stats.model_stats)


class Load:
    """Clients sending requests back to back on threads; records (start, end, error) per call."""

    def __init__(
        self, url: str, model: str, inputs: dict[str, np.ndarray], clients: int = 3
    ) -> None:
        self.url, self.model, self.inputs = url, model, inputs
        self.calls: list[tuple[float, float, str | None]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        client = grpcclient.InferenceServerClient(self.url)
        tensors = []
        for name, array in self.inputs.items():
            t = grpcclient.InferInput(
                name, list(array.shape), grpcclient.np_to_triton_dtype(array.dtype)
            )
            t.set_data_from_numpy(array)
            tensors.append(t)
        while not self._stop.is_set():
            start = time.monotonic()
            error = None
            try:
                client.infer(self.model, tensors, client_timeout=30)
            except InferenceServerException as e:
                error = f"{e.status()}: {e.message()}"
            except Exception as e:  # recorded, so that the test reports it instead of hanging
                error = repr(e)
            with self._lock:
                self.calls.append((start, time.monotonic(), error))
        client.close()

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
