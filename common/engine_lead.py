"""Whether one engine leads another beyond the noise of their timings: the rule the builder's
engine choice (builder/engine_choice.py), the gateway's re-check at start-up
(server/routing/retime.py) and the benchmark's judgement (bench/targets.py) share.

Each engine is timed in interleaved rounds, one throughput per round. An engine's *spread* is
the relative width of its rounds: ``(max - min) / median`` with fewer than :data:`IQR_ROUNDS`
rounds, the interquartile range over the median with more (one stray round of many does not
widen it). The *noise* of a comparison is the larger spread of the two engines; the *lead* of
the fastest engine is its median over the default engine's, minus one. The fastest engine
replaces the default only when its lead is larger than the noise and it is at least
``min_gain`` times as fast; otherwise the default stays, "within noise".
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

MIN_GAIN = 1.05  # an engine must be at least this much faster than the default, and beyond noise
IQR_ROUNDS = 5  # from this many rounds the spread is the interquartile range, below it max - min

# Verdicts (``Lead.verdict``)
DEFAULT_FASTEST = "default fastest"
WITHIN_NOISE = "within noise"
BEYOND_NOISE = "beyond noise"


def summary(values: Sequence[float]) -> dict[str, float]:
    """min / median / max and the relative ``spread`` (module docstring) of one engine's
    per-round throughputs."""
    if not values:
        raise ValueError("no timings")
    xs = sorted(float(v) for v in values)
    med = statistics.median(xs)
    if len(xs) >= IQR_ROUNDS:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
        width = q3 - q1
    else:
        width = xs[-1] - xs[0]
    return {
        "min": round(xs[0], 3),
        "median": round(med, 3),
        "max": round(xs[-1], 3),
        "spread": round(width / med, 4) if med > 0 else 0.0,
        "rounds": len(xs),
    }


@dataclass(frozen=True)
class Lead:
    """The outcome of comparing engines' round timings (:func:`judge`)."""

    chosen: str  # the engine to serve: ``fastest`` beyond noise, else ``default``
    default: str
    fastest: str  # by median throughput
    lead: float  # fastest's median / default's - 1 (0 when the default is fastest)
    noise: float  # the larger spread of the two
    verdict: str  # DEFAULT_FASTEST | WITHIN_NOISE | BEYOND_NOISE

    @property
    def switched(self) -> bool:
        return self.chosen != self.default

    def describe(self) -> str:
        """One phrase, e.g. ``openvino leads onnxruntime by +80% beyond the 12% spread``."""
        if self.verdict == DEFAULT_FASTEST:
            return f"{self.default} fastest measured"
        where = "beyond" if self.verdict == BEYOND_NOISE else "within"
        return (
            f"{self.fastest} leads {self.default} by {100 * self.lead:+.0f}% {where} the "
            f"{100 * self.noise:.0f}% spread"
        )

    def record(self) -> dict[str, Any]:
        return {
            "chosen": self.chosen,
            "default": self.default,
            "fastest": self.fastest,
            "lead": round(self.lead, 4),
            "noise": round(self.noise, 4),
            "verdict": self.verdict,
        }


def judge(default: str, rounds: Mapping[str, Sequence[float]], min_gain: float = MIN_GAIN) -> Lead:
    """Which engine to serve, from each engine's per-round throughputs (higher is faster);
    ``default`` (the precision's own engine, or the one served now) must be among them."""
    stats = {name: summary(values) for name, values in rounds.items()}
    base = stats[default]
    fastest = max(stats, key=lambda n: (stats[n]["median"], n == default))
    if fastest == default or base["median"] <= 0:
        return Lead(default, default, default, 0.0, base["spread"], DEFAULT_FASTEST)
    best = stats[fastest]
    ratio = best["median"] / base["median"]
    noise = max(base["spread"], best["spread"])
    beyond = ratio - 1.0 > noise and ratio >= min_gain
    return Lead(
        fastest if beyond else default,
        default,
        fastest,
        ratio - 1.0,
        noise,
        BEYOND_NOISE if beyond else WITHIN_NOISE,
    )
