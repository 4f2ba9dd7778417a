"""Child processes: start one with its log in a file, wait until it is ready, stop it.

The one copy of what the gateway launcher, the Triton launcher, the load-test runner, the bench
and the tests all need (``subprocess`` alone does it; psutil adds nothing used here):

- :func:`start`: ``Popen`` with stdout+stderr appended to a log file, optionally in its own
  session (process group) so that :func:`stop` can take its children down with it;
- :func:`wait_ready`: poll a probe until it holds; fail at once, with the exit code and the tail
  of the log, if the process dies meanwhile (:class:`ProcessExited`), or after ``timeout``
  (:class:`ReadyTimeout`, also a ``TimeoutError``);
- :func:`stop`: terminate -> wait ``grace`` -> kill -> wait; with ``group=True`` the kill goes to
  the whole process group, and whatever is left of the group once the leader exited is killed.

This module is the base layer: it imports nothing from the project, so everything may use it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

Log = Path | Callable[[], str] | None
KILL_WAIT_S = 10.0


class ProcessError(Exception):
    """Base class: a child process did not start, become ready or stop as asked."""


class ProcessExited(ProcessError):
    """The process exited while we waited for it to become ready."""

    def __init__(self, message: str, returncode: int | None) -> None:
        super().__init__(message)
        self.returncode = returncode


class ReadyTimeout(ProcessError, TimeoutError):
    """The probe did not hold within the timeout."""


def start(
    cmd: Sequence[str],
    *,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    new_session: bool = False,
    cwd: Path | None = None,
) -> subprocess.Popen:
    """Start ``cmd`` with stdin from /dev/null and stdout+stderr appended to ``log_path``
    (discarded when None). ``new_session``: its own session and process group (for
    ``stop(..., group=True)``). The log file is closed here; the child keeps its own handle."""
    kwargs: dict = {
        "stdin": subprocess.DEVNULL,
        "env": dict(env) if env is not None else None,
        "cwd": cwd,
        "start_new_session": new_session,
    }
    if log_path is None:
        return subprocess.Popen(
            list(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs
        )
    with open(log_path, "ab") as log:
        return subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, **kwargs)


def log_tail(log: Log, chars: int = 2000) -> str:
    """The last ``chars`` characters of a log file (or of what a callable returns); "" if none."""
    if log is None:
        return ""
    if callable(log):
        text = log()
    else:
        try:
            text = Path(log).read_text(errors="replace")
        except OSError:
            return ""
    return text[-chars:]


def wait_ready(
    probe: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    proc: subprocess.Popen | None = None,
    log: Log = None,
    interval: float = 0.1,
) -> None:
    """Call ``probe`` every ``interval`` s until it returns true (an exception counts as "not
    yet"). Raises :class:`ProcessExited` as soon as ``proc`` (if given) has exited, and
    :class:`ReadyTimeout` after ``timeout`` s; both messages end with the tail of ``log``."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise ProcessExited(
                _message(f"{what}: process {proc.pid} exited with code {proc.returncode}", log),
                proc.returncode,
            )
        try:
            if probe():
                return
        except Exception as e:  # not listening yet, file half-written...
            last_error = e
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)
    detail = f" (last error: {last_error!r})" if last_error is not None else ""
    raise ReadyTimeout(_message(f"timed out after {timeout:.0f}s waiting for {what}{detail}", log))


def _message(head: str, log: Log) -> str:
    tail = log_tail(log)
    return f"{head}\n{tail}" if tail else head


def _signal_group(pgid: int, sig: int) -> None:
    # The group whose id is the child's pid exists only if the child (or a descendant) created it
    # (start(new_session=True)); a child left in our group is never matched, so ours is safe.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop(
    proc: subprocess.Popen,
    grace: float = 10.0,
    *,
    group: bool = False,
    kill_wait: float = KILL_WAIT_S,
) -> int | None:
    """terminate -> wait ``grace`` s -> kill -> wait; returns the exit code (None if it survived
    SIGKILL for ``kill_wait`` s). ``group``: SIGTERM goes to the leader (so it can stop its own
    children in order), SIGKILL to its whole process group, and once the leader exited whatever
    is left of the group is killed too."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            if group:
                _signal_group(proc.pid, signal.SIGKILL)
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=kill_wait)
    if group:
        _signal_group(proc.pid, signal.SIGKILL)
    return proc.returncode


def kill(proc: subprocess.Popen, *, group: bool = False, wait: float = KILL_WAIT_S) -> None:
    """SIGKILL at once (what a crash looks like), the whole process group with ``group``."""
    if proc.poll() is None:
        if group:
            _signal_group(proc.pid, signal.SIGKILL)
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait)


__all__ = [
    "ProcessError",
    "ProcessExited",
    "ReadyTimeout",
    "kill",
    "log_tail",
    "start",
    "stop",
    "wait_ready",
]
