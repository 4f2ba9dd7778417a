"""The supervised batcher (server/upstreams/embedded/batching.py): a batch only ever fails its own
members, a worker that dies is replaced, a full queue refuses at once. Engine doubles, no servers.

As in test_batching.py, requests are queued behind a blocker held inside the engine, so what a
worker finds in its queue is known; the timeouts only keep a broken batcher from hanging the run.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from prometheus_client import REGISTRY
from tritonclient.grpc import model_config_pb2 as mc

from server.errors import InternalError, Unavailable
from server.upstreams.embedded import batching
from server.upstreams.embedded.batching import BatchPolicy, DynamicBatcher

HANG_S = 30.0  # a liveness bound, never a speed assertion
MERGE = BatchPolicy(max_batch_size=16, dynamic=True, preferred_sizes=[16], max_queue_delay_s=0)


class _Die(BaseException):
    """Not an Exception: escapes the per-batch handler and ends the worker thread."""


class ScriptedSession:
    """Doubles its input. The first run waits inside the engine until ``release``; ``zero_d``:
    merged runs (more than one row) return a 0-d output; rows holding NaN raise (a client's
    bad input); a row of -1 raises :class:`_Die` (kills the thread)."""

    def __init__(self, zero_d: bool = False) -> None:
        self.zero_d = zero_d
        self.runs: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def run(self, feeds):
        x = feeds["x"]
        self.runs.append(x.shape[0])
        if len(self.runs) == 1:
            self.entered.set()
            if not self.release.wait(HANG_S):
                raise RuntimeError("the test never released the engine")
        if np.isnan(x).any():
            raise ValueError("NaN in the input")
        if (x == -1).all(axis=1).any():
            raise _Die()
        if self.zero_d and x.shape[0] > 1:
            return {"y": np.float32(1.0)}
        return {"y": x * 2}


def _row(value: float) -> np.ndarray:
    return np.full((1, 3), value, np.float32)


async def _queued_behind_blocker(
    batcher: DynamicBatcher, session: ScriptedSession, rows: list[np.ndarray]
) -> list:
    """Hold the engine with a blocker, queue ``rows``, release; each result or its exception."""
    blocker = asyncio.create_task(batcher.submit({"x": _row(0)}, None))
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, session.entered.wait, HANG_S)
    tasks = [asyncio.create_task(batcher.submit({"x": x}, None)) for x in rows]
    await asyncio.sleep(0)  # every task has queued its request
    session.release.set()
    await asyncio.wait_for(blocker, HANG_S)
    return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), HANG_S)


def _run(policy: BatchPolicy, session: ScriptedSession, scenario) -> object:
    async def main():
        batcher = DynamicBatcher([session], policy, ("m", "fp32"), name="m_fp32")
        batcher.start()
        try:
            return await scenario(batcher)
        finally:
            session.release.set()
            await batcher.close()

    return asyncio.run(main())


def test_a_0d_engine_output_fails_only_its_batch_and_the_next_request_is_served():
    session = ScriptedSession(zero_d=True)

    async def scenario(batcher):
        merged = await _queued_behind_blocker(batcher, session, [_row(1), _row(2)])
        after = await asyncio.wait_for(batcher.submit({"x": _row(5)}, None), HANG_S)
        return merged, after, batcher.alive()

    merged, after, alive = _run(MERGE, session, scenario)
    assert session.runs[:2] == [1, 2]  # the two requests were merged into one run
    # the merged run's output cannot be sliced; each member then ran alone and was answered
    np.testing.assert_array_equal(merged[0]["y"], _row(2))
    np.testing.assert_array_equal(merged[1]["y"], _row(4))
    np.testing.assert_array_equal(after["y"], _row(10))
    assert alive


def test_a_0d_output_of_a_single_request_is_a_clear_internal_error():
    session = ScriptedSession()
    policy = BatchPolicy(max_batch_size=16, dynamic=False)

    async def scenario(batcher):
        session.release.set()
        session.zero_d = True
        first = await asyncio.wait_for(batcher.submit({"x": _row(1)}, None), HANG_S)
        with pytest.raises(InternalError, match=r"'y' has shape \[\], expected a leading batch"):
            await asyncio.wait_for(batcher.submit({"x": np.ones((2, 3), np.float32)}, None), 30)
        return first, await asyncio.wait_for(batcher.submit({"x": _row(3)}, None), HANG_S)

    first, after = _run(policy, session, scenario)
    np.testing.assert_array_equal(first["y"], _row(2))
    np.testing.assert_array_equal(after["y"], _row(6))


def test_one_clients_bad_input_fails_only_its_own_request():
    session = ScriptedSession()

    async def scenario(batcher):
        return await _queued_behind_blocker(batcher, session, [_row(1), _row(np.nan), _row(3)])

    good, bad, other = _run(MERGE, session, scenario)
    assert session.runs[1] == 3  # merged first; the failed run was then split
    assert isinstance(bad, InternalError) and "NaN in the input" in bad.message
    np.testing.assert_array_equal(good["y"], _row(2))
    np.testing.assert_array_equal(other["y"], _row(6))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # _Die
def test_a_dead_worker_fails_its_batch_and_is_replaced():
    session = ScriptedSession()
    policy = BatchPolicy(max_batch_size=16, dynamic=False)

    async def scenario(batcher):
        session.release.set()
        with pytest.raises(InternalError, match="engine worker of m_fp32 failed"):
            await asyncio.wait_for(batcher.submit({"x": _row(-1)}, None), HANG_S)
        served = await asyncio.wait_for(batcher.submit({"x": _row(4)}, None), HANG_S)
        return served, batcher.alive()

    served, alive = _run(policy, session, scenario)
    np.testing.assert_array_equal(served["y"], _row(8))
    assert alive


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # _Die
def test_a_worker_dying_past_its_restart_budget_makes_the_variant_unready(monkeypatch):
    monkeypatch.setattr(batching, "MAX_RESTARTS", 2)
    session = ScriptedSession()
    policy = BatchPolicy(max_batch_size=16, dynamic=False)

    async def scenario(batcher):
        session.release.set()
        for _ in range(3):
            with pytest.raises(InternalError):
                await asyncio.wait_for(batcher.submit({"x": _row(-1)}, None), HANG_S)
        loop = asyncio.get_running_loop()
        for t in list(batcher._threads):  # the last death is final: no replacement
            await loop.run_in_executor(None, t.join, HANG_S)
        alive = batcher.alive()
        with pytest.raises(Unavailable, match="no live engine worker for m_fp32"):
            await batcher.submit({"x": _row(1)}, None)
        return alive

    assert _run(policy, session, scenario) is False


def test_a_full_queue_refuses_at_once_and_counts_the_rejection():
    session = ScriptedSession()
    policy = BatchPolicy(max_batch_size=16, dynamic=False, max_queue_size=2)
    labels = {"model": "m", "precision": "fp32"}
    before = REGISTRY.get_sample_value("precision_serve_queue_rejections_total", labels) or 0.0

    async def scenario(batcher):
        blocker = asyncio.create_task(batcher.submit({"x": _row(0)}, None))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, session.entered.wait, HANG_S)
        queued = [asyncio.create_task(batcher.submit({"x": _row(i)}, None)) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(Unavailable, match="queue full for m_fp32"):
            await batcher.submit({"x": _row(3)}, None)
        session.release.set()
        await asyncio.wait_for(blocker, HANG_S)
        return await asyncio.wait_for(asyncio.gather(*queued), HANG_S)

    served = _run(policy, session, scenario)
    assert [r["y"][0, 0] for r in served] == [2.0, 4.0]  # the queued ones are still served
    after = REGISTRY.get_sample_value("precision_serve_queue_rejections_total", labels)
    assert after == before + 1


def test_max_queue_size_comes_from_the_config(tiny_repository):
    from server.catalog import load_repository
    from server.upstreams.embedded.upstream import max_queue_size

    variant = load_repository(tiny_repository).variants()[0]
    assert max_queue_size(variant) == 0  # not set: unbounded
    cfg = mc.ModelConfig()
    cfg.CopyFrom(variant.config)
    cfg.dynamic_batching.default_queue_policy.max_queue_size = 7
    variant.config = cfg
    assert max_queue_size(variant) == 7
