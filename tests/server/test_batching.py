"""Dynamic batching (server/batching.py) with a recording engine session: no servers."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

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


@pytest.mark.integration
def test_gateway_merges_concurrent_requests_and_splits_answers(repo_copy):
    """Through the real server: a 50 ms queue delay in config.pbtxt makes 8 concurrent one-row
    requests share engine runs, and every client still gets its own row back."""
    import tritonclient.grpc.aio as aioclient

    from server.model_repository import read_config, write_config
    from server.runner import GatewayProcess
    from tests.server.conftest import ort_outputs, rows
    from tests.server.test_policies import sample_value, scrape

    cfg = read_config(repo_copy / "tiny_fp32")
    cfg.dynamic_batching.max_queue_delay_microseconds = 50_000
    del cfg.dynamic_batching.preferred_batch_size[:]
    cfg.dynamic_batching.preferred_batch_size.append(8)
    write_config(repo_copy / "tiny_fp32", cfg)
    x = rows(8, seed=12)
    want = ort_outputs(repo_copy, "fp32", x)

    async def send(url: str) -> list[np.ndarray]:
        client = aioclient.InferenceServerClient(url)
        try:

            async def one(i: int) -> np.ndarray:
                inp = aioclient.InferInput("x", [1, 16], "FP32")
                inp.set_data_from_numpy(x[i : i + 1])
                return (await client.infer("tiny_fp32", [inp])).as_numpy("logits")

            return await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await client.close()

    with GatewayProcess(repo_copy) as gw:
        got = asyncio.run(send(gw.grpc_url))
        text = scrape(gw.metrics_url)
    for i in range(8):
        np.testing.assert_allclose(got[i], want[i : i + 1], rtol=1e-5, atol=1e-6)
    labels = '{model="tiny",precision="fp32"}'
    runs = sample_value(text, f"precision_serve_batch_size_count{labels}")
    assert sample_value(text, f"precision_serve_batch_size_sum{labels}") == 8
    assert runs < 8  # some requests shared an engine run
