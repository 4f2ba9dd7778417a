"""A scheduled run's requests binned over time: p99, throughput and the precision mix per bin.

The mix is counted client-side from each response's ``precision`` parameter (the locustfile
records it); the expected accuracy loss of a bin is that mix weighted by the manifest's
``accuracy_loss`` per precision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from loadtest.schedule import Schedule


@dataclass
class Bin:
    t_s: float  # bin start, seconds since the first request
    users: int | None  # what the schedule asked for at the bin's middle
    requests: int
    failures: int
    throughput: float  # successful requests completed per second in the bin
    p99_ms: float | None  # over requests that completed in the bin, failures included
    shares: dict[str, float] = field(default_factory=dict)  # served precision -> share
    expected_loss: float | None = None  # traffic-weighted manifest accuracy_loss


@dataclass
class Timeline:
    label: str  # e.g. "fixed fp32", "slo"
    bin_s: float
    bins: list[Bin]

    def to_dict(self) -> dict[str, object]:
        return {"label": self.label, "bin_s": self.bin_s, "bins": [asdict(b) for b in self.bins]}


def load_record(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as d:
        out = {k: d[k] for k in d.files}
    if "precision" not in out:  # a record from before precisions were recorded
        out["precision"] = np.full(out["ok"].shape, "", dtype=str)
    return out


def bin_record(
    record: Mapping[str, np.ndarray],
    label: str,
    bin_s: float,
    schedule: Schedule | None = None,
    losses: Mapping[str, float | None] | None = None,
) -> Timeline:
    start, latency = record["start"], record["latency"]
    ok, served = record["ok"].astype(bool), record["precision"]
    if start.size == 0:
        return Timeline(label, bin_s, [])
    t0 = float(start.min())
    done = start + latency - t0  # completion time: a bin shows what finished in it
    n_bins = max(1, math.ceil(float(done.max()) / bin_s))
    index = np.minimum((done // bin_s).astype(int), n_bins - 1)
    bins = []
    for i in range(n_bins):
        sel = index == i
        n = int(sel.sum())
        good = ok[sel]
        mix = _shares(served[sel][good])
        mid = (i + 0.5) * bin_s
        bins.append(
            Bin(
                t_s=i * bin_s,
                users=schedule.users_at(mid) if schedule else None,
                requests=n,
                failures=n - int(good.sum()),
                throughput=float(good.sum()) / bin_s,
                p99_ms=float(np.percentile(latency[sel], 99) * 1000) if n else None,
                shares=mix,
                expected_loss=_expected_loss(mix, losses),
            )
        )
    return Timeline(label, bin_s, bins)


def _shares(served: np.ndarray) -> dict[str, float]:
    if served.size == 0:
        return {}
    names, counts = np.unique(served, return_counts=True)
    return {str(p): int(c) / served.size for p, c in zip(names, counts, strict=True) if p}


def _expected_loss(
    shares: Mapping[str, float], losses: Mapping[str, float | None] | None
) -> float | None:
    if not shares or losses is None:
        return None
    total = 0.0
    for precision, share in shares.items():
        loss = losses.get(precision)
        if loss is None:
            return None
        total += share * float(loss)
    return total


def within_objective(
    bins: Sequence[Bin], objective_ms: float, after_s: float = 0.0
) -> float | None:
    """Share of bins (with requests) from ``after_s`` on whose p99 meets the objective."""
    judged = [b for b in bins if b.t_s >= after_s and b.p99_ms is not None]
    if not judged:
        return None
    return sum(1 for b in judged if b.p99_ms <= objective_ms) / len(judged)


def first_shift(bins: Sequence[Bin], reference: str) -> float | None:
    """Start of the first bin in which another precision than ``reference`` served."""
    for b in bins:
        if any(p != reference and s > 0 for p, s in b.shares.items()):
            return b.t_s
    return None
