"""Dynamic batching (server/batching.py) with a recording engine session: no servers."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np

from server.batching import BatchPolicy, DynamicBatcher
from server.errors import DeadlineExceeded


class RecordingSession:
    """Doubles its input; records the rows of every run."""

    def __init__(self, delay: float = 0.0) -> None:
        self.runs: list[int] = []
        self.delay = delay
        self.lock = threading.Lock()

    def run(self, feeds):
        time.sleep(self.delay)
        with self.lock:
            self.runs.append(feeds["x"].shape[0])
        return {"y": feeds["x"] * 2}


def run_batcher(sessions, policy, requests, deadline=None):
    async def main():
        batcher = DynamicBatcher(sessions, policy, ("m", "fp32"))
        batcher.start()
        try:
            return await asyncio.gather(
                *(batcher.submit({"x": x}, deadline) for x in requests),
                return_exceptions=True,
            )
        finally:
            await batcher.close()

    return asyncio.run(main())


def test_concurrent_requests_merge_into_one_run():
    session = RecordingSession()
    policy = BatchPolicy(
        max_batch_size=32, dynamic=True, preferred_sizes=[4, 8], max_queue_delay_s=0.2
    )
    requests = [np.full((1, 3), i, np.float32) for i in range(8)]
    results = run_batcher([session], policy, requests)
    assert session.runs == [8]  # reached the largest preferred size: no need to wait longer
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r["y"], np.full((1, 3), 2 * i, np.float32))


def test_batches_never_exceed_max_batch_size_and_keep_row_order():
    session = RecordingSession()
    policy = BatchPolicy(
        max_batch_size=10, dynamic=True, preferred_sizes=[], max_queue_delay_s=0.05
    )
    requests = [np.arange(i * 12, i * 12 + 12, dtype=np.float32).reshape(4, 3) for i in range(7)]
    results = run_batcher([session], policy, requests)
    assert sum(session.runs) == 28 and max(session.runs) <= 10 and len(session.runs) >= 3
    for x, r in zip(requests, results, strict=True):
        np.testing.assert_array_equal(r["y"], x * 2)


def test_without_dynamic_batching_each_request_runs_alone():
    session = RecordingSession()
    policy = BatchPolicy(max_batch_size=8, dynamic=False)
    run_batcher([session], policy, [np.ones((2, 3), np.float32)] * 5)
    assert session.runs == [2, 2, 2, 2, 2]


def test_incompatible_shapes_are_not_merged():
    session = RecordingSession()
    policy = BatchPolicy(
        max_batch_size=16, dynamic=True, preferred_sizes=[16], max_queue_delay_s=0.05
    )
    requests = [np.ones((1, 3), np.float32), np.ones((1, 5), np.float32)] * 3
    results = run_batcher([session], policy, requests)
    assert sorted(session.runs) == [3, 3]
    assert [r["y"].shape for r in results] == [(1, 3), (1, 5)] * 3


def test_instances_run_in_parallel():
    sessions = [RecordingSession(delay=0.3), RecordingSession(delay=0.3)]
    policy = BatchPolicy(max_batch_size=1, dynamic=False)
    start = time.monotonic()
    run_batcher(sessions, policy, [np.ones((1, 3), np.float32)] * 2)
    assert [len(s.runs) for s in sessions] == [1, 1]  # each instance took one request
    assert time.monotonic() - start < 0.55  # both ran at once, not one after the other


def test_deadline_expires_while_waiting():
    session = RecordingSession(delay=0.3)
    policy = BatchPolicy(max_batch_size=1, dynamic=False)
    results = run_batcher(
        [session], policy, [np.ones((1, 3), np.float32)] * 3, deadline=time.monotonic() + 0.1
    )
    assert all(isinstance(r, DeadlineExceeded) for r in results)
    assert session.runs == [1]  # the queued ones were dropped, never run


def test_unbatched_models_get_inputs_unchanged():
    session = RecordingSession()
    policy = BatchPolicy(
        max_batch_size=0, dynamic=True, preferred_sizes=[4], max_queue_delay_s=0.05
    )
    results = run_batcher([session], policy, [np.ones((3, 3), np.float32)] * 2)
    assert session.runs == [3, 3] and results[0]["y"].shape == (3, 3)
