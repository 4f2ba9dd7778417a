"""The embedded hot path: inline engine runs, one deadline timer, replies serialised from parts."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from server import metrics
from server.dataplane.gateway import InferResponse
from server.errors import DeadlineExceeded
from server.transports.grpc.service import infer_response_bytes
from server.upstreams.embedded import batching
from server.upstreams.embedded.batching import BatchPolicy, DynamicBatcher
from tests.helpers import skip_or_fail


class ThreadRecordingSession:
    """Doubles its input; records the thread of every run."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.threads: list[str] = []

    def run(self, feeds):
        time.sleep(self.delay)
        self.threads.append(threading.current_thread().name)
        return {"y": feeds["x"] * 2}


def sequential(session, policy, n, deadline=None):
    """``n`` requests one after the other, 20 ms apart (so the worker is idle again: it marks
    itself idle just after answering); the loop thread's name and each result."""

    async def main():
        batcher = DynamicBatcher([session], policy, ("m", "fp32"), name="worker")
        batcher.start()
        results = []
        try:
            for i in range(n):
                await asyncio.sleep(0.02)
                x = np.full((1, 3), i, np.float32)
                try:
                    results.append(await batcher.submit({"x": x}, deadline))
                except DeadlineExceeded as e:
                    results.append(e)
        finally:
            await batcher.close()
        return threading.current_thread().name, results

    return asyncio.run(main())


FAST = BatchPolicy(max_batch_size=8, dynamic=True, preferred_sizes=[4], inline_max_s=0.05)


def test_short_runs_move_onto_the_event_loop_thread():
    session = ThreadRecordingSession()
    loop_thread, results = sequential(session, FAST, 4)
    # the first run's duration is unknown: it goes to the worker; the rest run inline
    assert session.threads[0] == "worker-0"
    assert session.threads[1:] == [loop_thread] * 3
    for i, r in enumerate(results):
        np.testing.assert_array_equal(r["y"], np.full((1, 3), 2 * i, np.float32))


def test_slow_runs_stay_on_the_worker():
    session = ThreadRecordingSession(delay=0.08)  # over inline_max_s
    sequential(session, FAST, 3)
    assert session.threads == ["worker-0"] * 3


@pytest.mark.parametrize(
    "policy",
    [
        BatchPolicy(max_batch_size=8, dynamic=True, max_queue_delay_s=0.001, inline_max_s=0.05),
        BatchPolicy(max_batch_size=8, dynamic=True),  # inline_max_s = 0: never
    ],
    ids=["batching-delay", "disabled"],
)
def test_no_inline_runs_with_a_batching_delay_or_when_disabled(policy):
    session = ThreadRecordingSession()
    sequential(session, policy, 3)
    assert session.threads == ["worker-0"] * 3


def test_an_inline_run_past_the_deadline_is_deadline_exceeded():
    session = ThreadRecordingSession()

    async def main():
        batcher = DynamicBatcher([session], FAST, ("m", "fp32"), name="worker")
        batcher.start()
        try:
            await batcher.submit({"x": np.ones((1, 3), np.float32)}, None)  # measured: fast
            await asyncio.sleep(0.02)
            session.delay = 0.03
            with pytest.raises(DeadlineExceeded):
                await batcher.submit({"x": np.ones((1, 3), np.float32)}, time.monotonic() + 0.01)
        finally:
            await batcher.close()
        return threading.current_thread().name

    loop_thread = asyncio.run(main())
    assert session.threads == ["worker-0", loop_thread]


def test_queued_request_expires_on_its_timer_and_is_never_run():
    session = ThreadRecordingSession(delay=0.3)
    policy = BatchPolicy(max_batch_size=1, dynamic=False)

    async def main():
        batcher = DynamicBatcher([session], policy, ("m", "fp32"))
        batcher.start()
        try:
            slow = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 3), np.float32)}, None))
            await asyncio.sleep(0.05)
            t0 = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await batcher.submit({"x": np.ones((1, 3), np.float32)}, t0 + 0.05)
            waited = time.monotonic() - t0
            await slow
        finally:
            await batcher.close()
        return waited

    waited = asyncio.run(main())
    assert waited < 0.25  # the timer fired, not the end of the slow run ahead of it
    assert len(session.threads) == 1  # only the slow one ran: the expired one was dropped


def test_reply_built_from_parts_equals_the_message_built_the_usual_way():
    logits = np.arange(20, dtype=np.float32).reshape(2, 10)
    sliced = np.arange(40, dtype=np.int64).reshape(4, 10)[1:3]
    r = InferResponse("digits_int8", "1", "int8", "req-7", {"logits": logits, "ids": sliced})
    got = pb.ModelInferResponse.FromString(infer_response_bytes(r))
    want = pb.ModelInferResponse(model_name="digits_int8", model_version="1", id="req-7")
    want.parameters["precision"].string_param = "int8"
    for name, arr in r.outputs.items():
        want.outputs.add(name=name, datatype="FP32" if arr.dtype == np.float32 else "INT64")
        want.outputs[-1].shape.extend(arr.shape)
        want.raw_output_contents.append(arr.tobytes())
    assert got == want


def test_bound_children_are_the_metrics_own_series():
    child = metrics.requests("fastpath-test", "int8", "grpc", "ok")
    assert child is metrics.requests("fastpath-test", "int8", "grpc", "ok")
    before = metrics.REQUESTS.labels("fastpath-test", "int8", "grpc", "ok")._value.get()
    child.inc()
    after = metrics.REQUESTS.labels("fastpath-test", "int8", "grpc", "ok")._value.get()
    assert after == before + 1


@pytest.mark.parametrize(("options", "want"), [({}, "0"), ({"allow_spinning": True}, "1")])
def test_onnxruntime_threads_do_not_spin_unless_asked(tiny_repository, options, want):
    from common.engines import get_engine

    path = tiny_repository / "tiny_fp32" / "1" / "model.onnx"
    session = get_engine("onnxruntime").load(path, options, threads=2)
    entry = "session.intra_op.allow_spinning"
    assert session._session.get_session_options().get_session_config_entry(entry) == want


def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_the_cli_runs_the_gateway_on_uvloop_unless_told_otherwise():
    from server.runtime.event_loop import run_loop

    try:
        import uvloop  # noqa: F401
    except ImportError:
        skip_or_fail("uvloop is not installed (a dependency of precision-serve)")
    seen: list[str] = []

    async def probe() -> None:
        seen.append(_loop_module())

    run_loop(probe(), "auto")
    run_loop(probe(), "uvloop")
    run_loop(probe(), "asyncio")
    assert seen == ["uvloop", "uvloop", "asyncio"]


def concurrent(session, policy, callers, rounds):
    """``callers`` tasks each submitting ``rounds`` requests back to back (closed loop)."""

    async def main():
        batcher = DynamicBatcher([session], policy, ("m", "fp32"), name="worker")
        batcher.start()

        async def caller(i):
            for _ in range(rounds):
                await batcher.submit({"x": np.full((1, 3), i, np.float32)}, None)

        try:
            for _ in range(2):  # measured: fast; the inline run sets the first probe (due now)
                await batcher.submit({"x": np.ones((1, 3), np.float32)}, None)
                await asyncio.sleep(0.005)
            batching.PROBE_EVERY_S = 60.0  # that probe decides the rest
            await asyncio.gather(*(caller(i) for i in range(callers)))
            await asyncio.sleep(0.005)
            # judged worth batching: a lone request still goes to the worker (until the mode
            # is judged again, PROBE_REQUESTS later)
            await batcher.submit({"x": np.ones((1, 3), np.float32)}, None)
        finally:
            await batcher.close()
        return threading.current_thread().name

    return asyncio.run(main())


class SizeRecordingSession(ThreadRecordingSession):
    def __init__(self, delay: float = 0.0) -> None:
        super().__init__(delay)
        self.sizes: list[int] = []

    def run(self, feeds):
        self.sizes.append(int(feeds["x"].shape[0]))
        return super().run(feeds)


def test_concurrent_callers_of_a_short_model_are_batched(monkeypatch):
    """Inline runs never batch (the loop accepts nothing while one runs); a probe of the
    batching mode finds several requests per run under concurrency and keeps batching."""
    monkeypatch.setattr(batching, "PROBE_EVERY_S", 0.0)
    session = SizeRecordingSession(delay=0.001)
    loop_thread = concurrent(session, FAST, callers=16, rounds=20)
    assert session.threads[-1] == "worker-0"
    pairs = zip(session.sizes[2:-1], session.threads[2:-1], strict=True)
    on_worker = [s for s, t in pairs if t != loop_thread]
    assert sum(on_worker) > 0.9 * 16 * 20  # nearly every request went through the worker
    assert sum(on_worker) / len(on_worker) >= batching.BATCH_MIN_REQUESTS  # in batches


def test_a_probe_without_batches_goes_back_to_inline_runs(monkeypatch):
    """One caller at a time: the probe's runs are one request each, so runs go inline again."""
    monkeypatch.setattr(batching, "PROBE_EVERY_S", 0.0)
    monkeypatch.setattr(batching, "PROBE_REQUESTS", 4)

    async def main():
        batcher = DynamicBatcher([session], FAST, ("m", "fp32"), name="worker")
        batcher.start()
        try:
            for i in range(10):
                await batcher.submit({"x": np.ones((1, 3), np.float32)}, None)
                await asyncio.sleep(0.005)  # the worker marks itself idle after answering
                if i == 2:
                    batching.PROBE_EVERY_S = 60.0  # one probe only
        finally:
            await batcher.close()
        return threading.current_thread().name

    session = ThreadRecordingSession()
    loop_thread = asyncio.run(main())
    # 1: duration unknown (worker); 2: inline; 3-6: the probe (worker), one request per run;
    # then inline again
    worker = "worker-0"
    assert session.threads == [worker, loop_thread] + [worker] * 4 + [loop_thread] * 4


def test_in_batching_mode_the_worker_waits_briefly_for_companions(monkeypatch):
    """Judged worth batching, a worker that has taken the queued request waits up to
    BATCH_COLLECT_S for more (0.5 s here, so the test does not race the loop): a request
    submitted 10 ms later shares its run. Outside batching mode it never waits."""
    monkeypatch.setattr(batching, "PROBE_EVERY_S", 0.0)
    monkeypatch.setattr(batching, "BATCH_COLLECT_S", 0.5)

    async def pair(batcher):
        first = asyncio.ensure_future(batcher.submit({"x": np.ones((1, 3), np.float32)}, None))
        await asyncio.sleep(0.01)
        await batcher.submit({"x": np.ones((1, 3), np.float32)}, None)
        await first

    async def main(session, policy, probe: bool):
        batcher = DynamicBatcher([session], policy, ("m", "fp32"), name="worker")
        batcher.start()
        try:
            if probe:  # unknown duration (worker), then inline: the probe is due at once
                for _ in range(2):
                    await batcher.submit({"x": np.ones((1, 3), np.float32)}, None)
                    await asyncio.sleep(0.005)
                batching.PROBE_EVERY_S = 60.0
            await pair(batcher)
        finally:
            await batcher.close()

    short = SizeRecordingSession()
    asyncio.run(main(short, FAST, probe=True))
    assert short.sizes[-1] == 2 and len(short.sizes) == 3  # the pair ran as one

    slow = SizeRecordingSession(delay=0.03)  # over inline_max_s: the worker, never batching mode
    asyncio.run(main(slow, BatchPolicy(max_batch_size=8, dynamic=True, inline_max_s=0.01), False))
    assert slow.sizes == [1, 1]  # no wait: the first ran at once, the second after it


def test_after_a_failed_judgement_the_next_probe_comes_soon_then_less_often(monkeypatch):
    """A judgement that sends runs back inline schedules the next probe after 1/8 of
    PROBE_EVERY_S, then 1/4, 1/2 and all of it while judgements keep failing (one caller: every
    probe runs one request per run and fails). Clock: fake, half a second per request."""
    monkeypatch.setattr(batching, "PROBE_EVERY_S", 8.0)
    monkeypatch.setattr(batching, "PROBE_REQUESTS", 2)
    monkeypatch.setattr(batching, "BATCH_COLLECT_S", 0.0)  # no wait on a frozen clock
    now = [0.0]
    runs: list[tuple[float, str]] = []

    class Session:
        def run(self, feeds):
            runs.append((now[0], threading.current_thread().name))
            return {"y": feeds["x"] * 2}

    async def main():
        batcher = DynamicBatcher([Session()], FAST, ("m", "fp32"), clock=lambda: now[0])
        batcher.start()
        try:
            while now[0] <= 40.0:
                await batcher.submit({"x": np.ones((1, 3), np.float32)}, None)
                await asyncio.sleep(0.005)  # the worker marks itself idle after answering
                now[0] += 0.5
        finally:
            await batcher.close()
        return threading.current_thread().name

    loop_thread = asyncio.run(main())
    threads = [t for _, t in runs]
    starts = [
        at
        for i, (at, t) in enumerate(runs)
        if i > 1 and t != loop_thread and threads[i - 1] == loop_thread
    ]
    # the first inline run (0.5) sets the first probe at 8.5; each probe of 3 requests is
    # judged (and fails) at its third, 1.0 s after it started: then 1, 2, 4, 8, 8 s to the next
    assert starts == [8.5, 10.5, 13.5, 18.5, 27.5, 36.5]
