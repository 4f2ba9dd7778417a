"""A/B of gateway builds or settings, side by side: ``python -m bench.ab``.

Each ``--gateway LABEL=TREE[:ARGS]`` starts ``python -m server.cli`` from source tree ``TREE``
(a checkout or a ``git worktree`` of another commit) with extra CLI ``ARGS``, on a repository
holding only the one variant measured; ``--env LABEL:NAME=VALUE`` adds an environment variable.
All gateways run at once; every round measures each of them at every concurrency, the order
rotating, with the benchmark's closed-loop grpc.aio client (one pre-serialised request). Printed
per gateway and concurrency: medians over rounds of req/s, p50, the gateway process's CPU per
request, engine runs' rows (``precision_serve_batch_size``; nan for a Triton upstream, which
runs no engine of its own) and the client's CPU per request. ``--triton`` also starts Triton
(``precision-serve triton start``'s launcher) on that repository, measures it directly as the
contender ``triton``, and replaces ``{triton}`` in the gateways' ARGS with its gRPC address
(``--upstream triton://{triton}``). This is how the fast-path rows of docs/gateway.md were
measured; it is a development tool, not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import clients, profiling
from bench.serving import load_targets, subset_repository
from common import process


@dataclass
class Gateway:
    label: str
    tree: Path
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    ports: dict[str, int] = field(default_factory=dict)


def parse_gateway(spec: str) -> Gateway:
    label, sep, rest = spec.partition("=")
    if not sep or not label or not rest:
        raise ValueError(f"--gateway {spec!r}: expected LABEL=TREE[:ARGS]")
    tree, _, args = rest.partition(":")
    if not (Path(tree) / "server" / "cli.py").is_file():
        raise ValueError(f"--gateway {spec!r}: {tree} has no server/cli.py")
    return Gateway(label, Path(tree).resolve(), shlex.split(args))


def _start(g: Gateway, repository: Path, workdir: Path) -> None:
    ready = workdir / f"{g.label}.ready.json"
    cmd = [
        sys.executable, "-m", "server.cli", "--repository", str(repository),
        "--ports", "0", "--ready-file", str(ready), "--shutdown", "drain=0",
        "--log-level", "ERROR", *g.args,
    ]  # fmt: skip
    env = {**os.environ, **g.env, "PYTHONPATH": str(g.tree)}
    g.proc = process.start(cmd, log_path=workdir / f"{g.label}.log", env=env, cwd=g.tree)
    process.wait_ready(ready.exists, 300, f"gateway {g.label}", proc=g.proc)
    g.ports = json.loads(ready.read_text())


def _batch_totals(g: Gateway) -> tuple[float, float]:
    return profiling.batch_totals(f"http://127.0.0.1:{g.ports['metrics_port']}/metrics")


def _window(server: Any, payload: bytes, c: int, seconds: float) -> dict[str, float]:
    """One window against a Gateway (CPU of its process, its batch metric) or Triton (its
    models run in stub processes: no CPU figure; no batch metric of ours)."""
    ours = isinstance(server, Gateway)
    address = f"127.0.0.1:{server.ports['grpc_port']}" if ours else server.grpc_url
    pid = server.proc.pid if ours and server.proc is not None else None
    rows0, runs0 = _batch_totals(server) if ours else (0.0, 0.0)
    cpu0 = profiling.process_cpu_seconds(pid) if pid else None
    wall0 = time.perf_counter()
    out = clients.grpc_window(address, payload, c, seconds, 0.5)
    wall = time.perf_counter() - wall0
    cpu1 = profiling.process_cpu_seconds(pid) if pid else None
    rows1, runs1 = _batch_totals(server) if ours else (0.0, 0.0)
    n = max(1, out["requests"])
    nan = float("nan")  # not measured (Triton): printed as nan, not as a zero
    cpu = (cpu1 - cpu0) * out["seconds"] / wall if cpu0 is not None and cpu1 is not None else nan
    return {
        "rps": out["rps"],
        "p50_ms": out["p50_ms"] or 0.0,
        "cpu_ms": 1000 * cpu / n,
        "per_run": (rows1 - rows0) / (runs1 - runs0) if ours and runs1 > runs0 else nan,
        "client_cpu_ms": out["client_cpu_ms_per_request"] or 0.0,
        "errors": out["errors"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--variant", default="digits:int8", help="MODEL:PRECISION")
    p.add_argument("--gateway", action="append", required=True, help="LABEL=TREE[:ARGS]")
    p.add_argument("--env", action="append", default=[], help="LABEL:NAME=VALUE")
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.5)
    p.add_argument("--triton", action="store_true", help="start Triton too ({triton} in ARGS)")
    p.add_argument("--threads", type=int, default=1, help="Triton's engine threads")
    args = p.parse_args(argv)
    try:
        gateways = [parse_gateway(s) for s in args.gateway]
        by_label = {g.label: g for g in gateways}
        for e in args.env:
            label, _, assignment = e.partition(":")
            name, sep, value = assignment.partition("=")
            if label not in by_label or not sep:
                raise ValueError(f"--env {e!r}: expected LABEL:NAME=VALUE for a --gateway label")
            by_label[label].env[name] = value
        model, _, precision = args.variant.partition(":")
        concurrencies = [int(c) for c in args.concurrency.split(",")]
    except ValueError as e:
        print(f"bench.ab: {e}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-ab-"))
    repo = subset_repository(args.repository, work / "repository", [(model, precision)])
    target = load_targets(args.repository, [(model, precision)], 1)[0]
    results: dict[str, dict[int, list[dict[str, float]]]] = {
        g.label: {c: [] for c in concurrencies} for g in gateways
    }
    contenders: list[tuple[str, Any]] = []  # label, pid and gRPC address (a Gateway, or Triton)
    with contextlib.ExitStack() as stack:
        if args.triton:
            from server.launcher.tritonserver import TritonOptions, TritonServer

            opts = TritonOptions(
                repository=repo, grpc_port=0, http_port=0, metrics_port=0,
                threads=args.threads, startup_timeout=300,
            )  # fmt: skip
            triton = stack.enter_context(TritonServer(opts))
            contenders.append(("triton", triton))
            results["triton"] = {c: [] for c in concurrencies}
            for g in gateways:
                g.args = [a.replace("{triton}", triton.grpc_url) for a in g.args]
        _measure(args, gateways, contenders, repo, work, target, concurrencies, results)
    labels = [label for label, _ in contenders]
    _print(args, labels, concurrencies, results)
    return 0


def _measure(
    args: argparse.Namespace,
    gateways: list[Gateway],
    contenders: list[tuple[str, Any]],
    repo: Path,
    work: Path,
    target: Any,
    concurrencies: list[int],
    results: dict[str, dict[int, list[dict[str, float]]]],
) -> None:
    try:
        for g in gateways:
            _start(g, repo, work)
            contenders.append((g.label, g))
        time.sleep(1.0)
        for r in range(args.rounds):
            order = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
            for c in concurrencies:
                for label, server in order:
                    window = _window(server, target.payload, c, args.seconds)
                    results[label][c].append(window)
    finally:
        for g in gateways:
            if g.proc is not None:
                process.stop(g.proc)


def _print(
    args: argparse.Namespace,
    labels: list[str],
    concurrencies: list[int],
    results: dict[str, dict[int, list[dict[str, float]]]],
) -> None:
    keys = ("rps", "p50_ms", "cpu_ms", "per_run", "client_cpu_ms")
    print(f"{args.variant}, {args.rounds} rounds of {args.seconds} s, medians; per concurrency: "
          + " ".join(keys))  # fmt: skip
    for label in labels:
        cells = []
        for c in concurrencies:
            runs = results[label][c]
            med = [statistics.median(w[k] for w in runs) for k in keys]
            cells.append(f"c{c} " + " ".join(f"{v:.3g}" for v in med))
        errors = sum(w["errors"] for c in concurrencies for w in results[label][c])
        print(f"{label:16} " + " | ".join(cells) + f" | errors {errors}")


if __name__ == "__main__":
    sys.exit(main())
