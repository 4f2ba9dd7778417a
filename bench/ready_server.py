"""A bench server in a subprocess that announces itself through a ready file.

``python -m MODULE ARGS --ready-file PATH`` must write ``{"grpc_port": N, ...}`` to PATH once it
serves; :class:`ReadyFileServer` starts it, waits for the file (or the process's death, with its
log), exposes ``grpc_url`` and ``pid``, and stops it (terminate -> wait -> kill) on exit.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from server import process


class ReadyFileServer:
    def __init__(self, module: str, args: list[str], what: str, timeout: float) -> None:
        self.module = module
        self.args = args
        self.what = what
        self.timeout = timeout
        self._tmp = tempfile.TemporaryDirectory(prefix=f"bench-{module.rsplit('.', 1)[-1]}-")
        self.proc: subprocess.Popen | None = None
        self.grpc_url = ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> ReadyFileServer:
        ready = Path(self._tmp.name) / "ready.json"
        log = Path(self._tmp.name) / "server.log"
        cmd = [sys.executable, "-m", self.module, *self.args, "--ready-file", str(ready)]
        self.proc = process.start(cmd, log_path=log)
        try:
            process.wait_ready(
                ready.exists, self.timeout, self.what, proc=self.proc, log=log, interval=0.05
            )
        except process.ProcessError:
            self.__exit__()
            raise
        self.grpc_url = f"127.0.0.1:{json.loads(ready.read_text())['grpc_port']}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            process.stop(self.proc, grace=10)
        self._tmp.cleanup()
