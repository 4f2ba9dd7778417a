"""Dynamic batching for the embedded upstream, following a variant's ``config.pbtxt``.

Concurrent requests for one variant wait in a queue; each instance (``instance_group`` count =
number of engine sessions) takes the oldest request, then keeps collecting compatible requests
(same non-batch shapes) for up to ``max_queue_delay_microseconds`` or until the rows reach the
largest ``preferred_batch_size`` (or ``max_batch_size``), concatenates them into one engine run
on a worker thread, and splits the outputs back. Without ``dynamic_batching`` every request
runs alone; with ``max_batch_size == 0`` inputs have no batch dimension and are never merged.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from server import metrics
from server.engines import EngineError, EngineSession
from server.errors import DeadlineExceeded, InternalError, Unavailable


@dataclass
class BatchPolicy:
    max_batch_size: int  # 0 = no batch dimension
    dynamic: bool
    preferred_sizes: list[int] = field(default_factory=list)
    max_queue_delay_s: float = 0.0

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
    enqueued: float
    deadline: float | None


def _shape_key(inputs: dict[str, np.ndarray], batched: bool) -> tuple:
    return tuple(sorted((k, v.shape[1:] if batched else v.shape) for k, v in inputs.items()))


class DynamicBatcher:
    """Queue + one worker task per engine session."""

    def __init__(
        self,
        sessions: list[EngineSession],
        policy: BatchPolicy,
        executor: Executor,
        labels: tuple[str, str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._policy = policy
        self._executor = executor
        self._labels = {"model": labels[0], "precision": labels[1]}
        self._clock = clock
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._workers: list[asyncio.Task] = []
        self._closed = False

    def start(self) -> None:
        self._workers = [
            asyncio.get_running_loop().create_task(self._worker(s)) for s in self._sessions
        ]

    async def close(self) -> None:
        self._closed = True
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        while self._queue:
            item = self._queue.popleft()
            if not item.future.done():
                item.future.set_exception(Unavailable("gateway is shutting down"))

    async def submit(
        self, inputs: dict[str, np.ndarray], deadline: float | None
    ) -> dict[str, np.ndarray]:
        if self._closed:
            raise Unavailable("gateway is shutting down")
        batched = self._policy.max_batch_size > 0
        rows = next(iter(inputs.values())).shape[0] if batched and inputs else 1
        fut = asyncio.get_running_loop().create_future()
        item = _Item(inputs, rows, _shape_key(inputs, batched), fut, self._clock(), deadline)
        self._queue.append(item)
        self._wakeup.set()
        timeout = None if deadline is None else max(0.0, deadline - self._clock())
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            fut.cancel()  # a worker that has not picked it up yet will skip it
            raise DeadlineExceeded("deadline exceeded while waiting for the engine") from None
        except asyncio.CancelledError:
            fut.cancel()
            raise

    # ---- worker side ------------------------------------------------------------------------
    def _pop_live(self) -> _Item | None:
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if item.deadline is not None and self._clock() >= item.deadline:
                item.future.set_exception(DeadlineExceeded("deadline exceeded in the queue"))
                continue
            return item
        return None

    def _take_compatible(self, first: _Item, batch: list[_Item], rows: int, limit: int) -> int:
        keep: deque[_Item] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if item.key == first.key and rows + item.rows <= limit:
                batch.append(item)
                rows += item.rows
            else:
                keep.append(item)
        self._queue.extendleft(reversed(keep))
        return rows

    async def _collect(self, first: _Item) -> list[_Item]:
        batch = [first]
        target = self._policy.target_rows
        if target <= 0 or first.rows >= target:
            return batch
        limit = self._policy.max_batch_size
        rows = self._take_compatible(first, batch, first.rows, limit)
        end = first.enqueued + self._policy.max_queue_delay_s
        while rows < target:
            remaining = end - self._clock()
            if remaining <= 0:
                break
            self._wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            rows = self._take_compatible(first, batch, rows, limit)
        if self._queue:
            self._wakeup.set()  # leftovers: let another worker look
        return batch

    async def _worker(self, session: EngineSession) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = self._pop_live()
            if item is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = await self._collect(item)
            batch = [b for b in batch if not b.future.done()]
            if not batch:
                continue
            await self._run(loop, session, batch)

    async def _run(self, loop, session: EngineSession, batch: list[_Item]) -> None:
        start = self._clock()
        for b in batch:
            metrics.QUEUE_DURATION.labels(**self._labels).observe(start - b.enqueued)
        if len(batch) == 1:
            feeds = batch[0].inputs
        else:
            feeds = {k: np.concatenate([b.inputs[k] for b in batch]) for k in batch[0].inputs}
        rows = sum(b.rows for b in batch)
        metrics.BATCH_SIZE.labels(**self._labels).observe(rows)
        try:
            outputs = await loop.run_in_executor(self._executor, session.run, feeds)
        except EngineError as e:
            for b in batch:
                if not b.future.done():
                    b.future.set_exception(InternalError(str(e)))
            return
        except Exception as e:  # never let a worker die
            for b in batch:
                if not b.future.done():
                    b.future.set_exception(InternalError(f"engine failed: {e}"))
            return
        finally:
            elapsed = self._clock() - start
            for _ in batch:
                metrics.UPSTREAM_DURATION.labels(**self._labels).observe(elapsed)
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_result(outputs)
            return
        offset = 0
        for b in batch:
            part = {k: v[offset : offset + b.rows] for k, v in outputs.items()}
            offset += b.rows
            if not b.future.done():
                b.future.set_result(part)
