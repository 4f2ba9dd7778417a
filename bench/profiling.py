"""What bounds a figure: process CPU time, the gateway's own timing histograms, ONNX Runtime's
profiler.

- :func:`process_cpu_seconds`: user + system CPU of a process from ``/proc/<pid>/stat``;
  :func:`process_tree_cpu_seconds`: the same for a process and all its descendants (the
  gateway and the Envoy front it supervises).
- :func:`scrape_histograms`: sum and count of the gateway's request / queue / upstream duration
  histograms (docs/metrics.md); the difference of two scrapes around a window gives the mean time
  a request spent in the gateway, waiting for a batch, and in the engine.
- :func:`batch_totals`: rows and runs of the gateway's engine batches (embedded upstream); the
  difference of two scrapes around a window gives the requests per run (1: inline).
- :func:`ort_op_profile`: ONNX Runtime's own profiler (``enable_profiling``) over a few runs,
  summed by operator type: where the engine's time goes.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

HISTOGRAMS = {
    "request": "precision_serve_request_duration_seconds",
    "queue": "precision_serve_queue_duration_seconds",
    "upstream": "precision_serve_upstream_duration_seconds",
    "batch_rows": "precision_serve_batch_size",
}


def process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds (None when the process is gone or not Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int | str) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def process_tree_cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` and every live descendant, in seconds (None when ``pid`` is
    gone). A descendant that exited between two readings drops out of the sum: read it around
    windows in which the tree does not change."""
    children: dict[int, list[int]] = defaultdict(list)
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(entry)
        if fields is None:
            continue
        children[int(fields[1])].append(int(entry))  # field 4 of proc(5): the parent
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    if pid not in ticks:
        return None
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += ticks.get(p, 0)
        todo.extend(children.get(p, []))
    return total / os.sysconf("SC_CLK_TCK")


# rows per engine run (embedded)
BATCH_METRICS = ("precision_serve_batch_size",)


def batch_totals(metrics_url: str) -> tuple[float, float]:
    """(rows, runs) summed over every variant's :data:`BATCH_METRICS` histograms."""
    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    total = {"_sum": 0.0, "_count": 0.0}
    names = {suffix: tuple(m + suffix for m in BATCH_METRICS) for suffix in total}
    for line in text.splitlines():
        for suffix, prefixes in names.items():
            if line.startswith(prefixes):
                total[suffix] += float(line.rsplit(" ", 1)[-1])
    return total["_sum"], total["_count"]


def scrape_histograms(metrics_url: str, model: str, precision: str) -> dict[str, list[float]]:
    """{kind: [sum, count]} of the gateway histograms for one model/precision."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as r:
        text = r.read().decode()
    wanted = {v: k for k, v in HISTOGRAMS.items()}
    out = {k: [0.0, 0.0] for k in HISTOGRAMS}
    for family in text_string_to_metric_families(text):
        kind = wanted.get(family.name)
        if kind is None:
            continue
        for s in family.samples:
            if s.labels.get("model") != model or s.labels.get("precision") != precision:
                continue
            if s.name.endswith("_sum"):
                out[kind][0] += s.value
            elif s.name.endswith("_count"):
                out[kind][1] += s.value
    return out


def histogram_means(
    before: dict[str, list[float]], after: dict[str, list[float]]
) -> dict[str, float | None]:
    """Mean per observation between two scrapes (ms for durations, rows for batch sizes)."""
    out: dict[str, float | None] = {}
    for kind in HISTOGRAMS:
        total = after[kind][0] - before[kind][0]
        count = after[kind][1] - before[kind][1]
        if count <= 0:
            out[kind] = None
        elif kind == "batch_rows":
            out["batch_rows_mean"] = round(total / count, 3)
        else:
            out[f"{kind}_ms_mean"] = round(1000 * total / count, 4)
    return out


def ort_op_profile(
    path: Path, feeds: dict[str, np.ndarray], threads: int, runs: int = 3, top: int = 8
) -> dict[str, Any]:
    """ONNX Runtime's profiler over ``runs`` runs of ``feeds`` (after one warm-up run):
    the operator types that take most of the kernel time, in ms per run."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="bench-ort-prof-") as tmp:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ort")
        if threads > 0:
            so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        sess.run(None, feeds)
        for _ in range(runs):
            sess.run(None, feeds)
        trace = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    model_run_us = []
    for ev in trace:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            by_op[ev.get("args", {}).get("op_name", "?")] += ev.get("dur", 0)
        elif ev.get("cat") == "Session" and ev.get("name") == "model_run":
            model_run_us.append(ev.get("dur", 0))
    kernel_total = sum(by_op.values())
    measured = model_run_us[1:] or model_run_us  # the first model_run is the warm-up
    top_ops = sorted(by_op.items(), key=lambda kv: -kv[1])[:top]
    return {
        "file": str(path),
        "runs": runs,
        "model_run_ms_median": round(float(np.median(measured)) / 1000, 3) if measured else None,
        "kernel_ms_per_run": round(kernel_total / 1000 / (runs + 1), 3),
        "top_ops": [
            {
                "op": op,
                "ms_per_run": round(us / 1000 / (runs + 1), 3),
                "share": round(us / kernel_total, 3) if kernel_total else None,
            }
            for op, us in top_ops
        ],
    }


def cprofile_summary(
    prof_file: Path, requests: int, top: int = 12, root: Path | None = None
) -> dict[str, Any]:
    """The main thread's functions by own time (cProfile), in microseconds per request."""
    import pstats

    stats = pstats.Stats(str(prof_file))
    rows = []
    total = 0.0
    for (file, line, func), (_cc, nc, tt, ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        total += tt
        rows.append((file, line, func, nc, tt, ct))
    per = max(requests, 1)

    def name(file: str, line: int, func: str) -> str:
        if root is not None and file.startswith(str(root)):
            file = file[len(str(root)) + 1 :]
        elif "site-packages/" in file:
            file = file.split("site-packages/", 1)[1]
        return f"{file}:{line}({func})" if line else func

    def entry(r: tuple) -> dict[str, Any]:
        return {
            "function": name(r[0], r[1], r[2]),
            "calls_per_request": round(r[3] / per, 2),
            "own_us_per_request": round(1e6 * r[4] / per, 1),
            "cumulative_us_per_request": round(1e6 * r[5] / per, 1),
        }

    by_own = sorted(rows, key=lambda r: -r[4])[:top]
    own_code = [r for r in rows if root is not None and r[0].startswith(str(root / "server"))]
    by_cum_own = sorted(own_code, key=lambda r: -r[5])[:top]
    return {
        "requests": requests,
        "main_thread_us_per_request": round(1e6 * total / per, 1),
        "top_own_time": [entry(r) for r in by_own],
        "gateway_code_by_cumulative": [entry(r) for r in by_cum_own],
    }
