"""NVIDIA's perf_analyzer as a second client over the serving paths.

The binary comes out of the ``tritonclient==2.40.0`` manylinux wheel (``make bench-tools``
puts it in ``.cache/bench-tools/bin/``, libcudart.so.12 in ``.cache/bench-tools/cuda/``; Debian's
``libb64-0d`` is the other library it needs). ``PERF_ANALYZER`` in the environment names
another binary. It runs on CPU: ``perf_analyzer -m MODEL -x 1 -u HOST:PORT -i grpc
--concurrency-range C -p MS -f report.csv``; its CSV (latencies in microseconds) is parsed into
the bench JSON by :func:`parse_csv`. It needs the server's ModelConfig and metadata, so it runs
against the gateway and Triton, not against KServe (which has no ModelConfig).
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench.peers import PeerError

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / ".cache" / "bench-tools"
CUDA_LIB = TOOLS / "cuda" / "nvidia" / "cuda_runtime" / "lib"
# Columns of perf_analyzer's CSV (microseconds) -> the bench JSON's names (milliseconds).
LATENCIES = {
    "p50 latency": "p50_ms",
    "p90 latency": "p90_ms",
    "p95 latency": "p95_ms",
    "p99 latency": "p99_ms",
    "Avg latency": "mean_ms",
}


class PerfAnalyzerMissing(PeerError):
    """No perf_analyzer binary (``make bench-tools`` installs it)."""


def binary() -> Path:
    path = Path(os.environ.get("PERF_ANALYZER") or TOOLS / "bin" / "perf_analyzer")
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise PerfAnalyzerMissing(f"no perf_analyzer at {path} (make bench-tools installs it)")
    return path


def environment() -> dict[str, str]:
    """This process's environment with libcudart.so.12's folder on LD_LIBRARY_PATH."""
    parts = [str(CUDA_LIB), os.environ.get("LD_LIBRARY_PATH", "")]
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(p for p in parts if p)}


def parse_csv(text: str) -> list[dict[str, Any]]:
    """One row per concurrency of a perf_analyzer ``-f`` CSV: requests/s and latencies in ms."""
    rows = []
    for row in csv.DictReader(io.StringIO(text.strip())):
        if not row.get("Concurrency"):
            continue
        out: dict[str, Any] = {
            "concurrency": int(row["Concurrency"]),
            "rps": float(row["Inferences/Second"]),
        }
        for column, key in LATENCIES.items():
            if row.get(column):
                out[key] = round(float(row[column]) / 1000.0, 4)
        rows.append(out)
    if not rows:
        raise PeerError(f"perf_analyzer CSV has no rows: {text[:200]!r}")
    return rows


def command(
    url: str, model: str, concurrency: int, window_ms: int, report: Path, stability: int = 100
) -> list[str]:
    """perf_analyzer's command line: synchronous gRPC calls at ``concurrency``, CSV to
    ``report``. Stability is loosened (``-s 100``, up to 6 windows): on a shared 2-core host
    the default 10 % never settles; the row still reports what perf_analyzer measured."""
    return [
        str(binary()), "-m", model, "-x", "1", "-u", url, "-i", "grpc",
        "--concurrency-range", str(concurrency), "-p", str(window_ms),
        "-s", str(stability), "-r", "6", "-f", str(report),
    ]  # fmt: skip


def _said(done: subprocess.CompletedProcess) -> str:
    """perf_analyzer's error lines (or the tail of what it printed)."""
    lines = (done.stdout + "\n" + done.stderr).splitlines()
    errors = [ln.strip() for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
    return " ".join(errors or [" ".join(" ".join(lines).split())[-300:]])[:400]


def measure(
    url: str,
    model: str,
    concurrency: int,
    window_ms: int = 2000,
    timeout: float = 180.0,
    stabilities: tuple[int, ...] = (100, 400),
) -> dict[str, Any]:
    """One perf_analyzer run at ``concurrency`` against ``url`` (gRPC): its parsed CSV row.
    When a run never gets stable within ``-s`` percent, once more with the next, looser one
    (``stability_percent`` in the row says which)."""
    with tempfile.TemporaryDirectory(prefix="bench-pa-") as tmp:
        report = Path(tmp) / "report.csv"
        for stability in stabilities:
            cmd = command(url, model, concurrency, window_ms, report, stability)
            try:
                done = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=timeout, env=environment()
                )
            except subprocess.TimeoutExpired as e:
                raise PeerError(f"perf_analyzer ran past {timeout:.0f}s") from e
            if done.returncode == 0 and report.exists():
                row = parse_csv(report.read_text())[0]
                return {**row, "window_ms": window_ms, "stability_percent": stability}
            if "stable" not in done.stdout:
                break
        raise PeerError(f"perf_analyzer exited with {done.returncode}: {_said(done)}")
