"""py-spy (the ``bench`` extra) sampling a serving process while a client loads it: which
Python functions the process's CPU time goes to. Used where a serving target is missed."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any


def executable() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def summarise(raw: str, top: int = 12) -> dict[str, Any]:
    """py-spy's ``--format raw`` (``frame;frame;... count`` per line) by own (innermost frame)
    and cumulative samples, as shares of all samples."""
    own: Counter[str] = Counter()
    cumulative: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            cumulative[f] += n

    def share(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "share": round(n / total, 4)} for f, n in c.most_common(top)]

    return {
        "samples": total,
        "top_own": share(own) if total else [],
        "top_cumulative": share(cumulative) if total else [],
    }


def profile_during(pid: int, seconds: float, load: Callable[[], Any]) -> dict[str, Any]:
    """Sample ``pid`` for ``seconds`` with py-spy (native frames off, idle excluded) while
    ``load()`` runs in this thread; returns the summary and what ``load()`` returned."""
    spy = executable()
    if spy is None:
        return {"error": "py-spy is not installed (make bench-tools)"}
    with tempfile.TemporaryDirectory(prefix="bench-pyspy-") as tmp:
        out = Path(tmp) / "raw.txt"
        cmd = [
            spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--format", "raw", "--output", str(out), "--rate", "200", "--nonblocking",
        ]  # fmt: skip
        result: dict[str, Any] = {}
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        t = threading.Thread(target=lambda: result.update(load=load()))
        t.start()
        said = proc.communicate(timeout=seconds + 60)[0].decode(errors="replace")
        t.join()
        if proc.returncode != 0 or not out.exists():
            return {
                "error": f"py-spy exited with {proc.returncode}: {' '.join(said.split())[-300:]}"
            }
        return {**summarise(out.read_text()), "client": result.get("load")}
