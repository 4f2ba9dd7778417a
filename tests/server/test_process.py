"""common.process: start, wait_ready (fails fast on exit), stop (terminate -> kill, groups)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from common import process

PY = sys.executable


def _alive(pid: int) -> bool:
    """Running (a zombie left to a PID 1 that does not reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _start_ignoring_term(tmp_path: Path, grandchild: bool = False) -> tuple[subprocess.Popen, Path]:
    """A child that ignores SIGTERM (and optionally a grandchild that does too); ready file
    written once the handler is set, holding the grandchild's pid."""
    ready = tmp_path / "ready"
    code = (
        "import os, signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "pid = ''\n"
        f"if {grandchild}:\n"
        "    g = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])\n"
        "    pid = str(g.pid)\n"
        "    time.sleep(0.5)\n"
        f"open({str(ready)!r} + '.tmp', 'w').write(pid)\n"
        f"os.replace({str(ready)!r} + '.tmp', {str(ready)!r})\n"
        "time.sleep(300)\n"
    )
    proc = process.start([PY, "-c", code], log_path=tmp_path / "log", new_session=grandchild)
    process.wait_ready(ready.exists, 60, "the child's ready file", proc=proc, log=tmp_path / "log")
    return proc, ready


def test_wait_ready_returns_once_the_probe_holds(tmp_path: Path) -> None:
    calls = []

    def probe() -> bool:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("not yet")
        return True

    process.wait_ready(probe, 30, "a probe", interval=0.01)
    assert len(calls) == 3


def test_wait_ready_fails_with_the_exit_code_and_log_tail_when_the_process_dies(
    tmp_path: Path,
) -> None:
    log = tmp_path / "child.log"
    cmd = [PY, "-c", "import sys; print('loading model: no such file', flush=True); sys.exit(3)"]
    proc = process.start(cmd, log_path=log)
    # a timeout far beyond the test's life: only the exit can end the wait
    with pytest.raises(process.ProcessExited) as err:
        process.wait_ready(lambda: False, 3600, "the child", proc=proc, log=log)
    assert err.value.returncode == 3
    assert f"the child: process {proc.pid} exited with code 3" in str(err.value)
    assert "loading model: no such file" in str(err.value)


def test_wait_ready_times_out_naming_what_and_the_last_error(tmp_path: Path) -> None:
    def probe() -> bool:
        raise ConnectionRefusedError("port closed")

    with pytest.raises(process.ReadyTimeout) as err:
        process.wait_ready(probe, 0.2, "the port", interval=0.05, log=lambda: "the log tail")
    assert isinstance(err.value, TimeoutError)
    message = str(err.value)
    assert "waiting for the port" in message
    assert "port closed" in message
    assert message.endswith("the log tail")


def test_stop_terminates_a_process_that_exits_on_sigterm(tmp_path: Path) -> None:
    proc = process.start([PY, "-c", "import time; time.sleep(300)"])
    assert process.stop(proc, grace=30) == -signal.SIGTERM


def test_stop_kills_a_process_that_ignores_sigterm(tmp_path: Path) -> None:
    proc, _ = _start_ignoring_term(tmp_path)
    assert process.stop(proc, grace=0.5) == -signal.SIGKILL
    assert not _alive(proc.pid)


def test_stop_group_takes_the_grandchildren_down_too(tmp_path: Path) -> None:
    proc, ready = _start_ignoring_term(tmp_path, grandchild=True)
    grandchild = int(ready.read_text())
    assert _alive(grandchild)
    assert process.stop(proc, grace=0.5, group=True) == -signal.SIGKILL
    process.wait_ready(lambda: not _alive(grandchild), 10, "the grandchild to go")


def test_stop_without_group_leaves_the_grandchild(tmp_path: Path) -> None:
    """What group=True is for: a plain stop only reaches the leader."""
    proc, ready = _start_ignoring_term(tmp_path, grandchild=True)
    grandchild = int(ready.read_text())
    try:
        process.stop(proc, grace=0.5)
        assert _alive(grandchild)
    finally:
        os.kill(grandchild, signal.SIGKILL)


def test_gateway_process_that_exits_at_start_up_fails_fast_with_its_error(tmp_path: Path) -> None:
    from server.runtime.runner import GatewayProcess, GatewayStartError

    gw = GatewayProcess(tmp_path / "no-such-repository", timeout=3600)
    with pytest.raises(GatewayStartError) as err:
        gw.start()
    assert "exited with code 2" in str(err.value)
    assert "precision-serve: error" in str(err.value)
    assert isinstance(err.value.__cause__, process.ProcessExited)
    gw.__exit__(None, None, None)
