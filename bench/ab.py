"""A/B of gateway builds or settings, side by side: ``python -m bench.ab``.

Each ``--gateway LABEL=TREE[:ARGS]`` starts ``python -m server.cli`` from source tree ``TREE``
(a checkout or a ``git worktree`` of another commit) with extra CLI ``ARGS``, on a repository
holding only the one variant measured; ``--env LABEL:NAME=VALUE`` adds an environment variable.
All gateways run at once; every round measures each of them at every concurrency, the order
rotating, with the benchmark's closed-loop grpc.aio client (one pre-serialised request). Printed
per gateway and concurrency: medians over rounds of req/s, p50, the gateway process's CPU per
request, engine runs' requests (from ``precision_serve_batch_size``) and the client's CPU per
request. This is how the fast-path rows of docs/gateway.md were measured; it is a development
tool, not part of ``make bench``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench import clients, profiling
from bench.serving import load_targets, subset_repository
from server import process

BATCH_METRIC = "precision_serve_batch_size"


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
        "--grpc-port", "0", "--http-port", "0", "--metrics-port", "0",
        "--ready-file", str(ready), "--drain-seconds", "0", "--log-level", "ERROR", *g.args,
    ]  # fmt: skip
    env = {**os.environ, **g.env, "PYTHONPATH": str(g.tree)}
    g.proc = process.start(cmd, log_path=workdir / f"{g.label}.log", env=env, cwd=g.tree)
    process.wait_ready(ready.exists, 300, f"gateway {g.label}", proc=g.proc)
    g.ports = json.loads(ready.read_text())


def _batch_totals(g: Gateway) -> tuple[float, float]:
    url = f"http://127.0.0.1:{g.ports['metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    total = {"_sum": 0.0, "_count": 0.0}
    for line in text.splitlines():
        for suffix in total:
            if line.startswith(BATCH_METRIC + suffix):
                total[suffix] += float(line.rsplit(" ", 1)[-1])
    return total["_sum"], total["_count"]


def _window(g: Gateway, payload: bytes, c: int, seconds: float) -> dict[str, float]:
    assert g.proc is not None
    rows0, runs0 = _batch_totals(g)
    cpu0, wall0 = profiling.process_cpu_seconds(g.proc.pid), time.perf_counter()
    out = clients.grpc_window(f"127.0.0.1:{g.ports['grpc_port']}", payload, c, seconds, 0.5)
    wall = time.perf_counter() - wall0
    cpu1 = profiling.process_cpu_seconds(g.proc.pid)
    rows1, runs1 = _batch_totals(g)
    n = max(1, out["requests"])
    cpu = (cpu1 - cpu0) * out["seconds"] / wall if cpu0 is not None and cpu1 is not None else 0
    return {
        "rps": out["rps"],
        "p50_ms": out["p50_ms"] or 0.0,
        "cpu_ms": 1000 * cpu / n,
        "per_run": (rows1 - rows0) / max(1.0, runs1 - runs0),
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
    try:
        for g in gateways:
            _start(g, repo, work)
        time.sleep(1.0)
        for r in range(args.rounds):
            order = gateways[r % len(gateways) :] + gateways[: r % len(gateways)]
            for c in concurrencies:
                for g in order:
                    results[g.label][c].append(_window(g, target.payload, c, args.seconds))
    finally:
        for g in gateways:
            if g.proc is not None:
                process.stop(g.proc)
    keys = ("rps", "p50_ms", "cpu_ms", "per_run", "client_cpu_ms")
    print(f"{args.variant}, {args.rounds} rounds of {args.seconds} s, medians; per concurrency: "
          + " ".join(keys))  # fmt: skip
    for g in gateways:
        cells = []
        for c in concurrencies:
            runs = results[g.label][c]
            med = [statistics.median(w[k] for w in runs) for k in keys]
            cells.append(f"c{c} " + " ".join(f"{v:.3g}" for v in med))
        errors = sum(w["errors"] for c in concurrencies for w in results[g.label][c])
        print(f"{g.label:16} " + " | ".join(cells) + f" | errors {errors}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
