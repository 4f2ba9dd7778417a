"""A Triton python-backend model for tests: the launcher's own model (server/launcher/
python_model.py), then a sleep of :data:`SECONDS_PER_REQUEST` per request of the batch.

Copied over a derived variant's ``model.py`` it makes that variant a rung with a fixed capacity
(1 / SECONDS_PER_REQUEST requests per second, whatever Triton's dynamic batcher merges) that
costs no CPU, so its latency rises with the load and not with how busy the test host is."""

from __future__ import annotations

import time
from typing import Any

from server.launcher.python_model import TritonPythonModel as _Model

SECONDS_PER_REQUEST = 0.025


class TritonPythonModel(_Model):
    def execute(self, requests: list[Any]) -> list[Any]:
        responses = super().execute(requests)
        time.sleep(SECONDS_PER_REQUEST * len(requests))
        return responses
