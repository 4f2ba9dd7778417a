"""Dynamic batching (server/upstreams/embedded/batching.py) with recording engine sessions: no
servers.

Nothing here depends on speed. Requests are queued while the engine is held inside a run (a
blocker request, released by an Event), so what the worker finds in its queue is known; with a
queue delay of 0 it batches exactly what is queued. Where a test needs the queue delay to matter
it is an hour, so only the batching rules can end the wait. Deadlines use a manual clock. The
timeouts below only keep a broken batcher from hanging the run.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from server.errors import DeadlineExceeded, InternalError
from server.upstreams.embedded.batching import BatchPolicy, DynamicBatcher

HANG_S = 30.0  # a liveness bound, never a speed assertion
HOUR = 3600.0


class RecordingSession:
    """Doubles its input; records the rows of every run. The first ``hold`` runs wait inside the
    engine until ``release`` is set (``entered`` is set when they are in)."""

    def __init__(self, hold: int = 0, barrier: threading.Barrier | None = None) -> None:
        self.runs: list[int] = []
        self.hold = hold
        self.barrier = barrier
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()

    def run(self, feeds):
        with self.lock:
            self.runs.append(feeds["x"].shape[0])
            held = len(self.runs) <= self.hold
        if self.barrier is not None:
            self.barrier.wait(HANG_S)  # every instance must be inside run() at the same time
        if held:
            self.entered.set()
            if not self.release.wait(HANG_S):
                raise RuntimeError("the test never released the engine")
        return {"y": feeds["x"] * 2}


class ManualClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _wait_entered(session: RecordingSession) -> None:
    entered = await asyncio.get_running_loop().run_in_executor(None, session.entered.wait, HANG_S)
    assert entered, "the blocker request never reached the engine"


def run_queued_behind_blocker(
    policy: BatchPolicy, requests: list[np.ndarray], blocker: np.ndarray | None = None
) -> tuple[RecordingSession, list]:
    """Hold the engine with one request, queue ``requests`` behind it, then release it.

    Returns the session (its ``runs[0]`` is the blocker) and the queued requests' results.
    """
    session = RecordingSession(hold=1)
    blocker = np.zeros((1, requests[0].shape[1]), np.float32) if blocker is None else blocker

    async def main():
        batcher = DynamicBatcher([session], policy, ("m", "fp32"))
        batcher.start()
        try:
            first = asyncio.create_task(batcher.submit({"x": blocker}, None))
            await _wait_entered(session)
            tasks = [asyncio.create_task(batcher.submit({"x": x}, None)) for x in requests]
            await asyncio.sleep(0)  # each task runs up to its await: all are queued now
            session.release.set()
            await asyncio.wait_for(first, HANG_S)
            return await asyncio.wait_for(asyncio.gather(*tasks), HANG_S)
        finally:
            session.release.set()
            await batcher.close()

    return session, asyncio.run(main())


def test_concurrent_requests_merge_into_one_run():
    """Eight one-row requests reach the largest preferred size: one run, without waiting out an
    hour's queue delay."""
    session = RecordingSession()
    policy = BatchPolicy(
        max_batch_size=32, dynamic=True, preferred_sizes=[4, 8], max_queue_delay_s=HOUR
    )
    requests = [np.full((1, 3), i, np.float32) for i in range(8)]

    async def main():
        batcher = DynamicBatcher([session], policy, ("m", "fp32"))
        batcher.start()
        try:
            calls = (batcher.submit({"x": x}, None) for x in requests)
            return await asyncio.wait_for(asyncio.gather(*calls), HANG_S)
        finally:
            await batcher.close()

    results = asyncio.run(main())
    assert session.runs == [8]
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r["y"], np.full((1, 3), 2 * i, np.float32))


def test_queued_requests_merge_up_to_max_batch_size_and_keep_row_order():
    policy = BatchPolicy(max_batch_size=10, dynamic=True, preferred_sizes=[], max_queue_delay_s=0)
    requests = [np.arange(i * 12, i * 12 + 12, dtype=np.float32).reshape(4, 3) for i in range(7)]
    session, results = run_queued_behind_blocker(policy, requests)
    assert session.runs == [1, 8, 8, 8, 4]  # 4 + 4 rows; a third request would make 12 > 10
    for x, r in zip(requests, results, strict=True):
        np.testing.assert_array_equal(r["y"], x * 2)


def test_without_dynamic_batching_each_request_runs_alone():
    policy = BatchPolicy(max_batch_size=8, dynamic=False)
    session, results = run_queued_behind_blocker(policy, [np.ones((2, 3), np.float32)] * 5)
    assert session.runs == [1, 2, 2, 2, 2, 2]  # five queued requests, still five runs
    assert [r["y"].shape for r in results] == [(2, 3)] * 5


def test_incompatible_shapes_are_not_merged():
    policy = BatchPolicy(max_batch_size=16, dynamic=True, preferred_sizes=[16], max_queue_delay_s=0)
    requests = [np.ones((1, 3), np.float32), np.ones((1, 5), np.float32)] * 3
    session, results = run_queued_behind_blocker(
        policy, requests, blocker=np.ones((1, 4), np.float32)
    )
    assert session.runs == [1, 3, 3]  # the three (1, 3) rows in one run, the (1, 5) in another
    assert [r["y"].shape for r in results] == [(1, 3), (1, 5)] * 3


def test_instances_run_in_parallel():
    """Each instance's run waits at a barrier for the other's: only parallel runs get through."""
    barrier = threading.Barrier(2)
    sessions = [RecordingSession(barrier=barrier), RecordingSession(barrier=barrier)]
    policy = BatchPolicy(max_batch_size=1, dynamic=False)

    async def main():
        batcher = DynamicBatcher(sessions, policy, ("m", "fp32"))
        batcher.start()
        try:
            calls = (batcher.submit({"x": np.ones((1, 3), np.float32)}, None) for _ in range(2))
            return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), HANG_S)
        finally:
            await batcher.close()

    results = asyncio.run(main())
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert [s.runs for s in sessions] == [[1], [1]]  # each instance took one request


def test_deadline_expires_while_waiting_for_a_busy_engine():
    """The callers give up while the engine is busy; the requests they dropped never run."""
    session = RecordingSession(hold=1)
    policy = BatchPolicy(max_batch_size=1, dynamic=False)
    x = np.ones((1, 3), np.float32)

    async def main():
        batcher = DynamicBatcher([session], policy, ("m", "fp32"))
        batcher.start()
        try:
            first = asyncio.create_task(batcher.submit({"x": x}, None))
            await _wait_entered(session)
            deadline = time.monotonic() + 0.2
            late = [batcher.submit({"x": x}, deadline) for _ in range(3)]
            results = await asyncio.wait_for(asyncio.gather(*late, return_exceptions=True), HANG_S)
            session.release.set()  # only now, after every caller got its answer
            await asyncio.wait_for(first, HANG_S)
            return results
        finally:
            session.release.set()
            await batcher.close()

    results = asyncio.run(main())
    assert all(isinstance(r, DeadlineExceeded) for r in results), results
    assert session.runs == [1]  # the blocker ran; the dropped ones never did


def test_cancelled_requests_never_run():
    """A caller that goes away (cancelled, no deadline) leaves nothing for the engine to run."""
    session = RecordingSession(hold=1)
    policy = BatchPolicy(max_batch_size=4, dynamic=True, preferred_sizes=[4], max_queue_delay_s=0)
    x = np.ones((1, 3), np.float32)

    async def main():
        batcher = DynamicBatcher([session], policy, ("m", "fp32"))
        batcher.start()
        try:
            first = asyncio.create_task(batcher.submit({"x": x}, None))
            await _wait_entered(session)
            gone = [asyncio.create_task(batcher.submit({"x": x}, None)) for _ in range(3)]
            await asyncio.sleep(0)  # queued
            for task in gone:
                task.cancel()
            await asyncio.gather(*gone, return_exceptions=True)
            session.release.set()
            await asyncio.wait_for(first, HANG_S)
            return await asyncio.wait_for(batcher.submit({"x": 3 * x}, None), HANG_S)
        finally:
            session.release.set()
            await batcher.close()

    last = asyncio.run(main())
    np.testing.assert_array_equal(last["y"], 6 * x)
    assert session.runs == [1, 1]  # the blocker, then the last request alone


def test_deadline_passed_in_the_queue_is_answered_without_running():
    """A request still queued when its deadline passes (manual clock) is failed by the worker."""
    clock = ManualClock()
    session = RecordingSession(hold=1)
    policy = BatchPolicy(max_batch_size=4, dynamic=True, preferred_sizes=[4], max_queue_delay_s=0)
    x = np.ones((1, 3), np.float32)

    async def main():
        batcher = DynamicBatcher([session], policy, ("m", "fp32"), clock=clock)
        batcher.start()
        try:
            first = asyncio.create_task(batcher.submit({"x": x}, None))
            await _wait_entered(session)
            expiring = [asyncio.create_task(batcher.submit({"x": x}, 10.0)) for _ in range(2)]
            alive = asyncio.create_task(batcher.submit({"x": x}, None))
            await asyncio.sleep(0)  # all three are queued
            clock.now = 20.0  # past the deadline of two of them
            session.release.set()
            await asyncio.wait_for(first, HANG_S)
            done = await asyncio.wait_for(
                asyncio.gather(*expiring, alive, return_exceptions=True), HANG_S
            )
            return done
        finally:
            session.release.set()
            await batcher.close()

    *expired, ok = asyncio.run(main())
    assert all(isinstance(r, DeadlineExceeded) for r in expired), expired
    assert "in the queue" in str(expired[0])
    np.testing.assert_array_equal(ok["y"], x * 2)
    assert session.runs == [1, 1]  # the blocker, then the live request alone


def test_an_engine_failure_fails_its_batch_not_the_worker():
    class Flaky(RecordingSession):
        def run(self, feeds):
            if feeds["x"][0, 0] < 0:
                raise RuntimeError("boom")
            return super().run(feeds)

    session = Flaky()
    policy = BatchPolicy(max_batch_size=4, dynamic=False)

    async def main():
        batcher = DynamicBatcher([session], policy, ("m", "fp32"))
        batcher.start()
        try:
            bad = await asyncio.gather(
                batcher.submit({"x": -np.ones((1, 3), np.float32)}, None), return_exceptions=True
            )
            good = await asyncio.wait_for(
                batcher.submit({"x": np.ones((1, 3), np.float32)}, None), HANG_S
            )
            return bad[0], good
        finally:
            await batcher.close()

    bad, good = asyncio.run(main())
    assert isinstance(bad, InternalError) and "boom" in str(bad)
    np.testing.assert_array_equal(good["y"], np.full((1, 3), 2, np.float32))


def test_unbatched_models_get_inputs_unchanged():
    policy = BatchPolicy(max_batch_size=0, dynamic=True, preferred_sizes=[4], max_queue_delay_s=0)
    session, results = run_queued_behind_blocker(
        policy, [np.ones((3, 3), np.float32)] * 2, blocker=np.ones((3, 3), np.float32)
    )
    assert session.runs == [3, 3, 3]  # queued together, yet never concatenated
    assert [r["y"].shape for r in results] == [(3, 3), (3, 3)]


@pytest.mark.integration
def test_gateway_merges_concurrent_requests_and_splits_answers(repo_copy):
    """Through the real server: with preferred size 8 and a queue delay of an hour in
    config.pbtxt, 8 concurrent one-row requests must share one engine run (only reaching 8 rows
    ends the wait), and every client still gets its own row back."""
    import tritonclient.grpc.aio as aioclient

    from common.model_repository import read_config, write_config
    from server.runtime.runner import GatewayProcess
    from tests.server.conftest import ort_outputs, rows
    from tests.server.test_policies import sample_value, scrape

    cfg = read_config(repo_copy / "tiny_fp32")
    cfg.dynamic_batching.max_queue_delay_microseconds = int(HOUR * 1e6)
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
                return (await client.infer("tiny_fp32", [inp], client_timeout=HANG_S)).as_numpy(
                    "logits"
                )

            return await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await client.close()

    with GatewayProcess(repo_copy) as gw:
        got = asyncio.run(send(gw.grpc_url))
        text = scrape(gw.metrics_url)
    for i in range(8):
        np.testing.assert_allclose(got[i], want[i : i + 1], rtol=1e-5, atol=1e-6)
    labels = '{model="tiny",precision="fp32"}'
    assert sample_value(text, f"precision_serve_batch_size_sum{labels}") == 8
    assert sample_value(text, f"precision_serve_batch_size_count{labels}") == 1  # one run
