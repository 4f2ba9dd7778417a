"""Dynamic batching for the embedded upstream, following a variant's ``config.pbtxt``.

Each engine instance (``instance_group`` count = number of sessions) is one worker thread, like
Triton's model instances. A worker takes the oldest request, keeps collecting compatible
requests (same non-batch shapes) for up to ``max_queue_delay_microseconds`` after it arrived or
until the rows reach the largest ``preferred_batch_size`` (never beyond ``max_batch_size``), runs
them as one concatenated engine call and hands each request its slice of the outputs. Without
``dynamic_batching`` every request runs alone; with ``max_batch_size == 0`` inputs have no batch
dimension and are never merged.

The queue lives under a ``threading.Condition`` so the batching delay has sub-millisecond
precision (asyncio timers round up to whole milliseconds) and the engine runs on the worker
thread itself. Results go back with ``call_soon_threadsafe``. One exception
(``BatchPolicy.inline_max_s``): with one instance, no batching delay, nothing queued or waiting
and short recent runs, a request runs on the event loop's thread at once - for a small model
the two thread hand-offs cost more than the run. A deadline is one loop timer per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from server import metrics
from server.engines import EngineError, EngineSession
from server.errors import DeadlineExceeded, GatewayError, InternalError, Unavailable


@dataclass
class BatchPolicy:
    max_batch_size: int  # 0 = no batch dimension
    dynamic: bool
    preferred_sizes: list[int] = field(default_factory=list)
    max_queue_delay_s: float = 0.0
    # Run a request on the event loop's own thread when the one instance is idle, nothing is
    # queued, there is no batching delay and recent engine runs took under this long (0 = never).
    # Saves the two thread hand-offs (and their GIL contention) that dominate a small model.
    inline_max_s: float = 0.0

    @property
    def target_rows(self) -> int:
        if not self.dynamic or self.max_batch_size <= 0:
            return 0
        return max(self.preferred_sizes, default=self.max_batch_size)


@dataclass
class _Item:
    inputs: dict[str, np.ndarray]
    rows: int
    key: tuple
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float
    deadline: float | None
    dropped: bool = False  # the caller gave up (cancelled / deadline): skip it

    def resolve(self, result: dict[str, np.ndarray] | None, error: GatewayError | None) -> None:
        def settle() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting any more
            self.loop.call_soon_threadsafe(settle)


def _engine_message(e: Exception) -> str:
    return str(e) if isinstance(e, EngineError) else f"engine failed: {e}"


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(DeadlineExceeded("deadline exceeded while waiting for the engine"))


def _shape_key(inputs: dict[str, np.ndarray], batched: bool) -> tuple:
    return tuple(sorted((k, v.shape[1:] if batched else v.shape) for k, v in inputs.items()))


class DynamicBatcher:
    """A request queue plus one worker thread per engine session."""

    def __init__(
        self,
        sessions: list[EngineSession],
        policy: BatchPolicy,
        labels: tuple[str, str],
        clock: Callable[[], float] = time.monotonic,
        name: str = "engine",
    ) -> None:
        self._sessions = sessions
        self._policy = policy
        # labelled children bound once per variant, not looked up per request
        self._queue_hist = metrics.QUEUE_DURATION.labels(*labels)
        self._batch_hist = metrics.BATCH_SIZE.labels(*labels)
        self._upstream_hist = metrics.UPSTREAM_DURATION.labels(*labels)
        self._clock = clock
        self._name = name
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._busy = 0  # instances running a batch (under the lock)
        self._waiting = 0  # callers awaiting a worker's answer (event loop thread only)
        # moving average of engine-run seconds (decides inline runs; unknown until a run)
        self._run_s = math.inf
        self._inline = (
            policy.inline_max_s > 0 and len(sessions) == 1 and policy.max_queue_delay_s <= 0
        )

    def start(self) -> None:
        for i, session in enumerate(self._sessions):
            t = threading.Thread(
                target=self._worker, args=(session,), name=f"{self._name}-{i}", daemon=True
            )
            t.start()
            self._threads.append(t)

    async def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        loop = asyncio.get_running_loop()
        for t in self._threads:
            await loop.run_in_executor(None, t.join, 10.0)
        with self._cond:
            leftovers, self._queue = list(self._queue), deque()
        for item in leftovers:
            if not item.future.done():
                item.future.set_exception(Unavailable("gateway is shutting down"))

    async def submit(
        self, inputs: dict[str, np.ndarray], deadline: float | None
    ) -> dict[str, np.ndarray]:
        batched = self._policy.max_batch_size > 0
        rows = next(iter(inputs.values())).shape[0] if batched and inputs else 1
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        item = _Item(inputs, rows, _shape_key(inputs, batched), fut, loop, self._clock(), deadline)
        with self._cond:
            if self._closed:
                raise Unavailable("gateway is shutting down")
            inline = (
                self._inline
                and not self._waiting
                and not self._busy
                and not self._queue
                and self._run_s < self._policy.inline_max_s
            )
            if inline:
                self._busy += 1
            else:
                self._queue.append(item)
                self._cond.notify()
        if inline:
            return self._run_inline(item)
        # One timer instead of wait_for(shield(...)): only when there is a deadline at all.
        timer = (
            None if deadline is None else loop.call_later(deadline - self._clock(), _expire, fut)
        )
        self._waiting += 1
        try:
            return await fut
        finally:
            self._waiting -= 1
            item.dropped = fut.cancelled() or fut.exception() is not None
            if timer is not None:
                timer.cancel()

    def _observe_run(self, seconds: float) -> None:
        last = self._run_s
        self._run_s = seconds if last == math.inf else last + 0.2 * (seconds - last)

    def _run_inline(self, item: _Item) -> dict[str, np.ndarray]:
        try:
            self._batch_hist.observe(item.rows)
            self._queue_hist.observe(0.0)
            start = self._clock()
            if item.deadline is not None and start >= item.deadline:
                raise DeadlineExceeded("deadline exceeded before the engine ran")
            try:
                outputs = self._sessions[0].run(item.inputs)
            except Exception as e:
                raise InternalError(_engine_message(e)) from e
            finally:
                elapsed = self._clock() - start
                self._upstream_hist.observe(elapsed)
                self._observe_run(elapsed)
            if item.deadline is not None and self._clock() >= item.deadline:
                raise DeadlineExceeded("deadline exceeded while the engine ran")
            return outputs
        finally:
            with self._cond:
                self._busy -= 1
                if self._queue:
                    self._cond.notify()

    # ---- worker threads -----------------------------------------------------------------------
    def _pop_live(self) -> _Item | None:
        while self._queue:
            item = self._queue.popleft()
            if item.dropped:
                continue
            if item.deadline is not None and self._clock() >= item.deadline:
                item.resolve(None, DeadlineExceeded("deadline exceeded in the queue"))
                continue
            return item
        return None

    def _take_compatible(self, first: _Item, batch: list[_Item], rows: int) -> int:
        limit = self._policy.max_batch_size
        keep: deque[_Item] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.dropped:
                continue
            if item.key == first.key and rows + item.rows <= limit:
                batch.append(item)
                rows += item.rows
            else:
                keep.append(item)
        self._queue.extendleft(reversed(keep))
        return rows

    def _next_batch(self) -> list[_Item] | None:
        """Under the lock: the next batch to run, or None when closed."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                first = self._pop_live()
                if first is not None:
                    break
                self._cond.wait()
            batch = [first]
            target = self._policy.target_rows
            if target > 0 and first.rows < target:
                rows = self._take_compatible(first, batch, first.rows)
                end = first.enqueued + self._policy.max_queue_delay_s
                while rows < target and not self._closed:
                    remaining = end - self._clock()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                    rows = self._take_compatible(first, batch, rows)
            if self._queue:
                self._cond.notify()  # leftovers for another instance
            self._busy += 1
            return batch

    def _worker(self, session: EngineSession) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            batch = [b for b in batch if not b.dropped]
            try:
                if batch:
                    self._run(session, batch)
            finally:
                with self._cond:
                    self._busy -= 1

    def _run(self, session: EngineSession, batch: list[_Item]) -> None:
        start = self._clock()
        for b in batch:
            self._queue_hist.observe(start - b.enqueued)
        rows = sum(b.rows for b in batch)
        self._batch_hist.observe(rows)
        try:
            if len(batch) == 1:
                feeds = batch[0].inputs
            else:
                feeds = {k: np.concatenate([b.inputs[k] for b in batch]) for k in batch[0].inputs}
            outputs = session.run(feeds)
        except Exception as e:  # an engine failure fails this batch, never the worker
            message = _engine_message(e)
            for b in batch:
                b.resolve(None, InternalError(message))
            return
        finally:
            elapsed = self._clock() - start
            self._observe_run(elapsed)
            for _ in batch:
                self._upstream_hist.observe(elapsed)
        if len(batch) == 1:
            batch[0].resolve(outputs, None)
            return
        offset = 0
        for b in batch:
            b.resolve({k: v[offset : offset + b.rows] for k, v in outputs.items()}, None)
            offset += b.rows
