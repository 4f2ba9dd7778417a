"""The serving paths beside the gateway's own: the gateway with ``--workers 2`` and KServe's
``ModelServer`` (:mod:`bench.peers.kserve_peer`), started into :class:`bench.serving.Servers`.

- ``gateway_workers2``: the gateway (embedded upstream) started with ``--workers 2`` when its
  CLI accepts the option; otherwise the path reports *not available*.
- ``kserve``: every measured variant served by KServe's Python ``ModelServer`` (ONNX Runtime,
  the same file and thread count); *skipped* when the ``bench`` extra is not installed.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

WORKERS = 2


@functools.cache
def gateway_accepts_workers() -> bool:
    """Does ``python -m server.cli --help`` list ``--workers``?"""
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    try:
        out = subprocess.run(
            [sys.executable, "-m", "server.cli", "--help"],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--workers" in out.stdout


def start_peer_paths(
    servers: Any, wanted: list[tuple[str, str]], source: Path, args: list[str]
) -> None:
    """Start ``gateway_workers2`` and ``kserve`` through ``servers._start`` (errors recorded
    per path in ``servers.errors``). ``args``: the gateway's common arguments."""
    from bench.peers import kserve_peer
    from server.runtime.runner import GatewayProcess

    if gateway_accepts_workers():
        argv = [*args, "--workers", str(WORKERS)]
        servers._start(
            "gateway_workers2", lambda: GatewayProcess(servers.repository, argv, timeout=300)
        )
    else:
        servers.errors["gateway_workers2"] = (
            "not available: the gateway CLI has no --workers option yet"
        )
    if not kserve_peer.available():
        servers.errors["kserve"] = "skipped: kserve is not installed (make bench-tools)"
        return
    servers._start(
        "kserve", lambda: kserve_peer.KServePeer(source, wanted, servers.threads, timeout=300)
    )


PA_CONCURRENCIES = (4, 16)
PA_PATHS = ("gateway", "triton", "gateway_triton", "gateway_envoy", "gateway_workers2", "kserve")
PROFILED_PATHS = ("gateway", "gateway_triton")
PROFILE_CONCURRENCY = 16


def perf_analyzer_over_paths(servers: Any, target: Any, seconds: float, log: Any) -> dict:
    """perf_analyzer at c4 and c16 over every live path it can drive; per path and
    concurrency its parsed CSV row, or the error it stopped with."""
    from bench.peers import PeerError, perf_analyzer

    try:
        perf_analyzer.binary()
    except PeerError as e:
        return {"error": str(e)}
    out: dict[str, Any] = {"variant": target.triton_name, "paths": {}}
    window_ms = max(1000, int(seconds * 1000))
    for path in [p for p in PA_PATHS if p in servers.targets]:
        per: dict[str, Any] = {}
        for c in PA_CONCURRENCIES:
            try:
                per[str(c)] = perf_analyzer.measure(
                    servers.targets[path], target.triton_name, c, window_ms
                )
            except PeerError as e:
                per[str(c)] = {"error": str(e)[:300]}
                if "model config" in str(e):
                    break  # the server has no ModelConfig: every concurrency stops there
        out["paths"][path] = per
        log(f"  perf_analyzer {path}: { {c: r.get('rps', 'error') for c, r in per.items()} }")
    return out


def pyspy_over_paths(servers: Any, target: Any, seconds: float, log: Any) -> dict:
    """py-spy on the gateway processes while the bench client runs them at c16."""
    from bench import clients, pyspy

    out: dict[str, Any] = {}
    for path in [p for p in PROFILED_PATHS if p in servers.procs]:

        def load(path: str = path) -> dict[str, Any]:
            url = servers.targets[path]
            return clients.grpc_window(url, target.payload, PROFILE_CONCURRENCY, seconds, 0.3)

        prof = pyspy.profile_during(servers.procs[path].pid, seconds, load)
        prof["concurrency"] = PROFILE_CONCURRENCY
        out[path] = prof
        log(f"  py-spy {path}: {prof.get('samples', prof.get('error'))} samples")
    return out
