"""Resident memory and open file descriptors of a process, from /proc, sampled over time."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcSample:
    t: float  # seconds since the sampler started
    rss_bytes: int
    fds: int


def rss_bytes(pid: int) -> int:
    """``VmRSS`` of ``/proc/PID/status`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ProcessLookupError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    """Entries in ``/proc/PID/fd``."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(pid: int, t: float) -> ProcSample:
    return ProcSample(t, rss_bytes(pid), open_fds(pid))


class Sampler:
    """A daemon thread taking one :class:`ProcSample` of ``pid`` every ``interval_s`` until
    stopped (or until the process is gone); ``samples`` grows while it runs."""

    def __init__(self, pid: int, interval_s: float = 1.0, start: float | None = None) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.t0 = time.monotonic() if start is None else start
        self.samples: list[ProcSample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="procstat", daemon=True)

    def now(self) -> ProcSample:
        return sample(self.pid, time.monotonic() - self.t0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append(self.now())
            except (OSError, ProcessLookupError):
                return
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
