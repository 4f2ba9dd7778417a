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
(``BatchPolicy.inline_max_s``): with one instance, no batching delay, nothing queued or running
and short recent runs, a request runs on the event loop's thread at once - for a small model
the two thread hand-offs cost more than the run. But inline runs never batch: while one runs
the loop accepts nothing, so under concurrent load every run is one request. So every
``PROBE_EVERY_S`` the batcher sends ``PROBE_REQUESTS`` requests through the worker (a probe);
when they ran at least ``BATCH_MIN_REQUESTS`` requests per engine run, it stays in that batching
mode (re-judged every ``PROBE_REQUESTS`` requests) until the mean drops under it, then runs
inline again and probes again after 1/8 of ``PROBE_EVERY_S``, then 1/4, 1/2 and all of it while
judgements keep failing (a low judgement under load, such as a burst's first requests, then
costs a quarter of a second of inline runs, not two seconds). In that mode a worker waits
``BATCH_COLLECT_S`` (50 us) for companions before each run: a worker quicker than the loop
otherwise runs the requests one by one (the probe then saw 1.1-2.2 requests per run at
concurrency 16 and ran inline, at 0.7x the throughput).
Measured (``digits_int8``, 2 cores, docs/gateway.md): inline is faster at 1.0 and 1.7 requests
per run (concurrency 1 and 4), the worker at 5-6 (concurrency 16).
A deadline is one loop timer per request.

Supervision: a batch only ever fails its own members. Requests batch together only with the same
non-batch shapes and dtypes; a merged run that fails (one client's input may be the cause) is run
again member by member, so only the request that fails alone gets the error. Everything a batch
does (concatenation, the run, checking and slicing the outputs) is inside that one ``try``; an
output without the batch dimension fails the batch with a clear InternalError. A worker thread
that dies anyway fails its batch and is restarted (at most ``MAX_RESTARTS`` in
``RESTART_WINDOW_S``); :meth:`DynamicBatcher.alive` (the variant's readiness) is false when a
worker is dead for good. ``max_queue_size`` (the config's
``dynamic_batching.default_queue_policy.max_queue_size``; 0 = unbounded) bounds the queue: a
request beyond it is refused at once with UNAVAILABLE "queue full for <variant>" and counted in
``precision_serve_queue_rejections_total``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from common.engines import EngineError, EngineSession
from server import metrics
from server.errors import DeadlineExceeded, GatewayError, InternalError, Unavailable

log = logging.getLogger(__name__)

# Inline runs vs batching on the worker (see the module docstring).
PROBE_EVERY_S = 2.0  # while inline: how often PROBE_REQUESTS go to the worker instead
PROBE_REQUESTS = 64  # requests per judgement of the batching mode
BATCH_MIN_REQUESTS = 2.5  # requests per engine run for batching to beat inline runs
# In batching mode a worker that has taken what was queued waits up to this long for more
# (while the loop is submitting them) before it runs: without it a worker that is quicker than
# the loop runs one request at a time, and the probe judges batching worthless (see above).
BATCH_COLLECT_S = 50e-6

MAX_RESTARTS = 5  # worker restarts allowed per RESTART_WINDOW_S before a worker stays dead
RESTART_WINDOW_S = 60.0


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
    max_queue_size: int = 0  # requests waiting for a worker (0 = unbounded)

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
    return tuple(
        sorted((k, v.dtype.str, v.shape[1:] if batched else v.shape) for k, v in inputs.items())
    )


class _BadOutput(Exception):
    """The engine's outputs cannot be handed back (not batch-first, not a mapping)."""


def _split(outputs: object, members: list[int], batched: bool) -> list[dict[str, np.ndarray]]:
    """Each member's outputs (``members``: their row counts): its rows of every output (checked
    first, so nothing half-fails)."""
    if not isinstance(outputs, dict):
        raise _BadOutput(f"engine returned {type(outputs).__name__}, not outputs by name")
    if not batched:
        return [outputs]
    rows = sum(members)
    arrays = {}
    for name, value in outputs.items():
        arr = np.asarray(value)
        if arr.ndim == 0 or arr.shape[0] != rows:
            raise _BadOutput(
                f"engine output {name!r} has shape {list(arr.shape)}, expected a leading batch "
                f"dimension of {rows}"
            )
        arrays[name] = arr
    if len(members) == 1:
        return [arrays]
    out, offset = [], 0
    for n in members:
        out.append({k: v[offset : offset + n] for k, v in arrays.items()})
        offset += n
    return out


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
        self._restarts: deque[float] = deque()  # clock() of recent worker restarts
        self._dead = False  # a worker died past its restart budget: the variant is unready
        self._closed = False
        self._rejections = metrics.QUEUE_REJECTIONS.labels(*labels)
        self._busy = 0  # instances running a batch (under the lock)
        # moving average of engine-run seconds (decides inline runs; unknown until a run): of
        # inline runs, and of worker runs only while it says "too slow for inline" - a worker
        # run's time includes waiting for the GIL the loop holds, and in batching mode its
        # several requests
        self._run_s = math.inf
        self._inline = (
            policy.inline_max_s > 0 and len(sessions) == 1 and policy.max_queue_delay_s <= 0
        )
        # inline vs batching mode (event loop thread); runs and requests counted by the worker
        self._batching = False
        self._next_probe = math.inf  # set by the first inline run
        self._failed_judgements = 0  # judgements in a row that sent runs back inline
        self._judged = 0  # requests submitted in batching mode since the last judgement
        self._runs = 0  # worker runs and their requests since then (under the lock)
        self._run_requests = 0

    def start(self) -> None:
        self._threads = [self._spawn(i) for i in range(len(self._sessions))]

    def _spawn(self, index: int) -> threading.Thread:
        t = threading.Thread(
            target=self._worker_main, args=(index,), name=f"{self._name}-{index}", daemon=True
        )
        t.start()
        return t

    def alive(self) -> bool:
        """Every worker runs (or is being replaced): what the variant's readiness reports."""
        return not self._closed and not self._dead and all(t.is_alive() for t in self._threads)

    def _worker_main(self, index: int) -> None:
        try:
            self._worker(self._sessions[index])
        finally:
            self._supervise(index)

    def _supervise(self, index: int) -> None:
        """A worker thread is ending: replace it unless closing or past the restart budget."""
        with self._cond:
            if self._closed:
                return
            now = self._clock()
            while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
                self._restarts.popleft()
            if len(self._restarts) >= MAX_RESTARTS:
                self._dead = True
                leftovers, self._queue = list(self._queue), deque()
            else:
                self._restarts.append(now)
                leftovers = None
        if leftovers is not None:
            log.error(
                "batcher worker %s-%d died too often; the variant is unready", self._name, index
            )
            for item in leftovers:
                item.resolve(None, Unavailable(f"no live engine worker for {self._name}"))
            return
        log.error("batcher worker %s-%d died; restarting it", self._name, index)
        self._threads[index] = self._spawn(index)

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
        item = None  # built only for the queue: an inline run needs no future or shape key
        with self._cond:
            if self._closed:
                raise Unavailable("gateway is shutting down")
            if self._dead:
                raise Unavailable(f"no live engine worker for {self._name}")
            limit = self._policy.max_queue_size
            if limit and len(self._queue) >= limit:
                self._rejections.inc()
                raise Unavailable(f"queue full for {self._name} (max_queue_size {limit})")
            fast = self._inline and self._run_s < self._policy.inline_max_s
            if fast:
                self._choose_mode()
            inline = fast and not self._batching and not self._busy and not self._queue
            if inline:
                self._busy += 1
            else:
                loop = asyncio.get_running_loop()
                fut = loop.create_future()
                key = _shape_key(inputs, batched)
                item = _Item(inputs, rows, key, fut, loop, self._clock(), deadline)
                self._queue.append(item)
                self._cond.notify()
        if item is None:
            return self._run_inline(inputs, rows, deadline)
        # One timer instead of wait_for(shield(...)): only when there is a deadline at all.
        timer = (
            None if deadline is None else loop.call_later(deadline - self._clock(), _expire, fut)
        )
        try:
            return await fut
        finally:
            item.dropped = fut.cancelled() or fut.exception() is not None
            if timer is not None:
                timer.cancel()

    def _choose_mode(self) -> None:
        """Under the lock, for a model short enough to run inline: start a probe of the
        batching mode when one is due; in batching mode, judge it every PROBE_REQUESTS."""
        now = self._clock()
        if not self._batching:
            if now >= self._next_probe:
                self._batching = True
                self._judged = self._runs = self._run_requests = 0
            return
        self._judged += 1
        if self._judged < PROBE_REQUESTS:
            return
        per_run = self._run_requests / self._runs if self._runs else 0.0
        self._judged = self._runs = self._run_requests = 0
        if per_run >= BATCH_MIN_REQUESTS:
            self._failed_judgements = 0
            return
        # back to inline runs; the next probe after 1/8, 1/4, 1/2, then all of PROBE_EVERY_S:
        # one low judgement under load (a burst's first requests) costs a fraction of a second
        self._batching = False
        backoff = 2.0 ** min(0, self._failed_judgements - 3)
        self._failed_judgements += 1
        self._next_probe = now + PROBE_EVERY_S * backoff
        log.debug("%s: %.2f requests per run: inline runs", self._name, per_run)

    def _observe_run(self, seconds: float, inline: bool = False) -> None:
        last = self._run_s
        if not inline and last < self._policy.inline_max_s:
            return
        self._run_s = seconds if last == math.inf else last + 0.2 * (seconds - last)

    def _run_inline(
        self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None
    ) -> dict[str, np.ndarray]:
        if self._next_probe == math.inf:
            self._next_probe = self._clock() + PROBE_EVERY_S
        try:
            self._batch_hist.observe(rows)
            self._queue_hist.observe(0.0)
            start = self._clock()
            if deadline is not None and start >= deadline:
                raise DeadlineExceeded("deadline exceeded before the engine ran")
            try:
                outputs = self._sessions[0].run(inputs)
                (result,) = _split(outputs, [rows], self._policy.max_batch_size > 0)
            except Exception as e:
                raise InternalError(self._failure(e)) from None
            finally:
                elapsed = self._clock() - start
                self._upstream_hist.observe(elapsed)
                self._observe_run(elapsed, inline=True)
            if deadline is not None and self._clock() >= deadline:
                raise DeadlineExceeded("deadline exceeded while the engine ran")
            return result
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
                if self._batching:  # a short model under load: wait for companions
                    end = max(end, self._clock() + BATCH_COLLECT_S)
                while rows < target and not self._closed:
                    remaining = end - self._clock()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                    rows = self._take_compatible(first, batch, rows)
            if self._queue:
                self._cond.notify()  # leftovers for another instance
            self._busy += 1
            self._runs += 1
            self._run_requests += len(batch)
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
            except BaseException as e:  # never lose a request: fail it; the supervisor restarts
                for b in batch:
                    b.resolve(None, InternalError(f"engine worker of {self._name} failed: {e!r}"))
                raise
            finally:
                with self._cond:
                    self._busy -= 1

    def _failure(self, e: Exception) -> str:
        if isinstance(e, _BadOutput):
            return f"{self._name}: {e}"
        return _engine_message(e)

    def _run(self, session: EngineSession, batch: list[_Item]) -> None:
        start = self._clock()
        for b in batch:
            self._queue_hist.observe(start - b.enqueued)
        self._batch_hist.observe(sum(b.rows for b in batch))
        try:
            results = self._execute(session, batch)
        except Exception as e:  # an engine failure fails this batch, never the worker
            if len(batch) > 1:  # one member's input may be the cause: each runs alone
                for b in batch:
                    self._run_alone(session, b)
                return
            batch[0].resolve(None, InternalError(self._failure(e)))
            return
        for b, result in zip(batch, results, strict=True):
            b.resolve(result, None)

    def _run_alone(self, session: EngineSession, item: _Item) -> None:
        try:
            (result,) = self._execute(session, [item])
        except Exception as e:
            item.resolve(None, InternalError(self._failure(e)))
        else:
            item.resolve(result, None)

    def _execute(self, session: EngineSession, batch: list[_Item]) -> list[dict[str, np.ndarray]]:
        """Concatenate, run and split one batch; raises whatever goes wrong."""
        start = self._clock()
        try:
            if len(batch) == 1:
                feeds = batch[0].inputs
            else:
                feeds = {k: np.concatenate([b.inputs[k] for b in batch]) for k in batch[0].inputs}
            outputs = session.run(feeds)
        finally:
            elapsed = self._clock() - start
            self._observe_run(elapsed)
            for _ in batch:
                self._upstream_hist.observe(elapsed)
        return _split(outputs, [b.rows for b in batch], self._policy.max_batch_size > 0)
